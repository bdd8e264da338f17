"""The benchmark scripts still run: each at its smallest on this CPU, and every command of gpu.sh parses.

A GPU is lent rarely and for minutes (docs/benchmarks.md, "GPU"): a script that broke since its last run,
or a flag that gpu.sh passes and a script no longer takes, would spend the whole loan on a traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def gpu_sh_commands(tmp_path: pathlib.Path) -> list[list[str]]:
    """What gpu.sh would run, recorded by an interpreter stub that answers its CUDA and import probes yes."""
    log, stub = tmp_path / "calls.tsv", tmp_path / "python"
    stub.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\nfor arg in "$@"; do printf "%s\\t" "$arg"; done >> "$LOG"\n'
                    'echo >> "$LOG"\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(stub), "LOG": str(log)})
    assert done.returncode == 0, done.stderr
    return [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()]


def test_every_command_of_gpu_sh_is_one_its_script_takes(tmp_path, monkeypatch):
    commands = gpu_sh_commands(tmp_path)
    scripts = [pathlib.Path(command[0]).name for command in commands]
    assert {"gpu_check.py", "optimizer.py", "step.py"} <= set(scripts)
    assert scripts.count("step.py") >= 4  # fold and layer forms, llama-350m, compile, checkpointing
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for script, (_, *args) in zip(scripts, commands):
        args = ["cpu" if arg == "cuda" and flag == "--device" else arg for flag, arg in zip([""] + args, args)]
        module = importlib.import_module(script.removesuffix(".py"))
        try:
            parsed = module.parse_args(args)
        except SystemExit:
            pytest.fail(f"gpu.sh runs {script} {' '.join(args)}, which {script} does not take (its error above)")
        assert parsed.device == "cpu", (script, args)


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_at_small_sizes():
    out = run_script("gpu_check.py", "--device", "cpu", "--small")
    verdicts = [line.rstrip(" |").rsplit("|", 1)[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert verdicts.count("ok") == 12 and "FAIL" not in verdicts, out  # 6 layer rows, 6 optimizer rows


@pytest.mark.slow
def test_optimizer_benchmark_times_every_orthogonalization():
    out = run_script("optimizer.py", "--preset", "tiny", "--blocks", "64", "--orthogonalize", "newton_schulz", "exact",
                     "auto", "--repeats", "1", "--chunks", "gpu")
    for label in ("| AdamW", "POET b=64, newton_schulz", "POET b=64, exact", "POET b=64, auto"):
        assert label in out, out


@pytest.mark.slow
def test_step_benchmark_measures_and_profiles_each_form():
    out = run_script("step.py", "--presets", "tiny", "--methods", "adamw", "poet", "paper", "--accum", "1", "2",
                     "--repeats", "1", "--warmup", "0", "--merges", "1", "--micro-batch", "2", "--seq-len", "32",
                     "--profile", "--activation-checkpointing", "both", "--flush-denormal")
    for text in ("AdamW", "POET (preset)", "POET-paper", "optimizer step", "ops dispatched in the step", "× AdamW",
                 "subnormal floats are flushed to zero"):
        assert text in out, out


@pytest.mark.slow
def test_layer_benchmark_and_cost_model_run():
    out = run_script("layer.py", "--device", "cpu", "--hidden", "512", "--tokens", "32", "--repeats", "1", "--warmup", "0")
    assert "nn.Linear" in out and "auto picked the measured-faster path in" in out, out
    out = run_script("cost_model.py")
    assert "llama-3b" in out and "8B" in out, out


@pytest.mark.slow
def test_quality_harness_tabulates_its_runs_and_refuses_to_mix_in_runs_of_other_settings(tmp_path):
    small = ["--set", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
             "data.vocab_size=300", "data.seq_len=32", "batch_size=2", "eval_tokens=256"]
    grid = ["--methods", "adamw", "--corpora", "sotu", "--seeds", "0", "--lrs-adamw", "1e-3", "3e-3", "--extend", "0",
            "--eval-every", "2", "--out", str(tmp_path / "q")]
    out = run_script("quality.py", "--steps", "4", *grid, *small)
    summaries = {lr: json.loads((tmp_path / "q" / "sotu" / f"adamw-lr{lr}-s0" / "summary.json").read_text())
                 for lr in ("0.001", "0.003")}
    best = min(summaries, key=lambda lr: summaries[lr]["final_val_ppl"])
    assert f"optim.lr_hidden={float(best):g}" in next(line for line in out.splitlines() if "**best** (at the grid's edge)" in line)
    for summary in summaries.values():
        assert f"{summary['final_val_ppl']:.2f}" in out
    assert (tmp_path / "q" / "img" / "quality_sotu_tokens.png").is_file()  # plots under --out unless --img says
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    again = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--steps", "6", *grid, *small], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "made with other settings than these" in again.stderr and "steps" in again.stderr


def test_quality_grid_extension_steps_past_the_edge_it_measured(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    quality = importlib.import_module("quality")
    assert quality.beyond_edge([1e-3, 3e-3, 1e-2], 1e-2) == 0.03  # one significant figure keeps names readable
    assert quality.beyond_edge([0.01, 0.012], 0.012) == 0.014  # where that would land back on the grid: more
    assert quality.beyond_edge([3e-4, 1e-3, 3e-3], 1e-3) is None
    assert quality.beyond_edge([3e-4, 1e-3], 1e-3) == 0.003  # 3e-3 failed: 1e-3 is the measured grid's edge


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module, as the scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_cpu_peak_leaves_out_frees_of_tensors_made_before_the_call(bench):
    common = bench("common")
    held = {}

    def make() -> None:
        held["old"] = torch.empty(1 << 20)  # 4 MiB, allocated inside an earlier profile: its size is known

    def replace() -> None:
        held["old"] = None
        held["new"] = torch.empty(1 << 18)  # 1 MiB

    common.peak_memory_bytes(make, "cpu")
    assert common.peak_memory_bytes(replace, "cpu") == 4 * (1 << 18)


def test_layer_peak_is_the_same_right_after_another_contender_used_the_same_input(bench):
    from poetlm import POETConfig, POETLinear

    layer = bench("layer")
    x = torch.randn(128, 64).requires_grad_()
    grad_out = torch.randn(128, 64)
    calls = {"linear": layer.make_step(torch.nn.Linear(64, 64, bias=False), x, grad_out),
             "poet": layer.make_step(POETLinear(64, 64, bias=False, config=POETConfig(variant="bs", block_size=32),
                                                name="t"), x, grad_out)}
    for call in calls.values():  # as the timing rounds leave them: every contender's gradients set
        layer.timed(*call)()
    alone = layer.call_peaks({"poet": calls["poet"]}, "cpu")["poet"]
    assert layer.call_peaks(calls, "cpu")["poet"] == alone


def counted_products(fn) -> int:
    """Matrix products that `fn` dispatches (each batched product counts once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
                torch.ops.aten.addmm.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in products
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_the_scripts_count_the_products_the_map_runs(bench):
    from poetlm import POETConfig, POETLinear
    from poetlm.orthogonal import cayley_neumann_increment

    cost_model, layer, step = bench("cost_model"), bench("layer"), bench("step")
    q = torch.randn(3, 8, 8)
    for terms in (1, 2, 3, 4, 5):
        assert cost_model.cnp_products(terms) == counted_products(lambda: cayley_neumann_increment(q, terms)), terms
    # Built once forward and back-propagated, in layer.py and step.py alike: 3·p·Σ n_blocks·b³ (p = 3 at k = 4).
    poet = POETLinear(96, 64, bias=False, config=POETConfig(variant="bs", block_size=32), name="t")
    cube = (3 + 2) * 32 ** 3
    assert cost_model.cnp_build_macs(4, cube) == 9 * cube
    assert layer.flop_model(poet, 0, input_centric=True) == 9 * cube
    rotations = 2 * 64 * poet.rotation_in.flops_per_vector + 3 * 96 * poet.rotation_out.flops_per_vector
    assert step.poet_build_macs(torch.nn.Sequential(poet)) == rotations + 9 * cube


def test_fold_flops_count_the_zero_padded_slots_the_optimizer_runs(bench):
    import types

    from poetlm import POETConfig, RuleConfig
    from poetlm.optim import POET

    cost_model, step = bench("cost_model"), bench("step")
    weight = torch.nn.Parameter(torch.randn(100, 64))  # out side: blocks of 64 and 36, the latter padded to 64
    fold = POET([weight], lr=0.02, poet=POETConfig(block_size=64), rule=RuleConfig(orthogonalize="newton_schulz"))
    rotate = 64 * (64 ** 2 + 36 ** 2) + 100 * 64 ** 2  # both sides' skew gradients
    per_block = cost_model.fold_block_products("newton_schulz", 4) * (2 + 1) * 64 ** 3
    assert step.fold_macs(types.SimpleNamespace(optimizers=[fold])) == rotate + (rotate + per_block) // 2  # alternating


def test_memory_targets_compare_with_adamw_under_the_same_options(bench):
    step = bench("step")
    memory = [{"accum": 1, "key": key, "label": label, "peak": peak}
              for key, label, peak in [("adamw", "AdamW", 100), ("adamw+ckpt", "AdamW +ckpt", 50),
                                       ("poet-b64", "POET bs b=64", 70), ("poet-b64+ckpt", "POET bs b=64 +ckpt", 45)]]
    lines = step.targets([{"preset": "llama-60m", "rows": [], "memory": memory, "fit": []}])
    assert any("POET bs b=64: peak memory 0.70× AdamW" in line for line in lines), lines
    assert any("POET bs b=64 +ckpt: peak memory 0.90× AdamW (target ≤ 0.80: missed)" in line for line in lines), lines


def test_step_times_balance_the_alternating_sides(bench):
    common = bench("common")
    calls = []
    times = common.interleaved_times({"step": lambda: calls.append(1)}, repeats=3, warmup=0)
    assert len(times["step"]) == len(calls) == 4  # rounded up to even: two steps of each side
    steps = [1.0, 3.0, 1.0, 3.0]  # the fold rule alternates a cheap and a dear step
    assert common.step_median(steps) == 2.0  # a median of the first three would say 1.0
    assert common.paired_ratio(steps, [1.0, 1.0, 1.0, 1.0]) == 2.0
    assert common.paired_ratio([1.0, 3.0, 3.0, 1.0, 1.0, 3.0], [1.0, 1.0, 2.0, 2.0, 1.0, 1.0]) == 2.0
    with pytest.raises(ValueError):
        common.step_median(steps[:3])


def test_numerics_judges_the_default_map_and_labels_columns_by_merge_count(bench):
    import math

    from poetlm import POETConfig

    numerics = bench("numerics")
    assert numerics.MAPS[numerics.DEFAULT_MAP] == (POETConfig().parameterization, POETConfig().neumann_terms)
    assert numerics.MAPS[numerics.PAPER_MAP] == ("cayley_neumann", 3)
    assert numerics.parse_args(["--merges", "20", "5"]).merges == [5, 20]  # the order drift_run fills them in
    # Second order at even k: √(1 + λ^{2k+2}) − 1 ≈ λ^{2k+2}/2, not the 0 that marks exact Cayley.
    assert numerics.predicted_singular_change(0.015, 4) == pytest.approx(0.015 ** 10 / 2, rel=1e-9, abs=0)
    assert numerics.predicted_singular_change(0.5, 2) == pytest.approx(math.sqrt(1 + 0.5 ** 6) - 1, rel=1e-12)


# ---------------------------------------------------------------- the quality harness's bookkeeping


def test_quality_gives_corpora_of_one_stem_directories_of_their_own(bench, tmp_path):
    quality = bench("quality")
    for folder in ("c1", "c2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.txt").write_text("text\n")
    a, b = str(tmp_path / "c1" / "data.txt"), str(tmp_path / "c2" / "data.txt")
    args = quality.parse_args(["--corpora", "sotu", a, b, "hf:a/x", "hf:b/x", "--out", str(tmp_path / "q")])
    dirs = {corpus: quality.run_dir(quality.Spec(quality.METHODS["poet"], 0.02, 0, corpus), args).parent
            for corpus in args.corpora}
    assert len(set(dirs.values())) == 5, dirs
    assert dirs["sotu"] == tmp_path / "q" / "sotu"  # an unambiguous stem keeps its directory, as before


def test_quality_refuses_a_missing_corpus_up_front(bench, tmp_path, capsys):
    quality = bench("quality")
    with pytest.raises(SystemExit) as exit:
        quality.parse_args(["--corpora", "sotu", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q")])
    assert exit.value.code != 0 and "missing.txt" in capsys.readouterr().err


@pytest.mark.parametrize("script,args,message", [
    ("step", ["--presets", "nope"], "no preset or config file named 'nope'"),
    ("step", ["--accum", "0"], "--accum: 0 is below 1: use a value of at least 1"),
    ("step", ["--repeats", "0"], "--repeats: 0 is below 1"),
    ("step", ["--micro-batch", "0"], "--micro-batch: 0 is below 1"),  # was read as "unset": the preset's 16
    ("step", ["--merges", "-1"], "--merges: -1 is below 0"),
    ("step", ["--seq-len", "1"], "--seq-len: 1 is below 2"),
    ("quality", ["--eval-every", "0"], "eval_every=0 is invalid"),
    ("quality", ["--set", "bogus=1"], "unknown config key(s) 'bogus'"),
    ("quality", ["--lrs-adamw", "0"], "--lrs-adamw: 0 is not above 0: use a value greater than 0"),
    ("quality", ["--lrs-adamw", "nan"], "--lrs-adamw: 'nan' is not a finite number: use a value greater than 0"),
])
def test_benchmarks_refuse_settings_every_run_would_fail_on_before_any_starts(bench, tmp_path, capsys, script, args, message):
    with pytest.raises(SystemExit) as exit:
        bench(script).parse_args([*args, *(["--out", str(tmp_path / "q")] if script == "quality" else [])])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_quality_marks_failed_runs_exits_nonzero_and_keeps_the_last_table(bench, tmp_path, monkeypatch, capsys):
    quality = bench("quality")

    def fail(command, stdout, **_):  # a `poetlm train` that stops with an error
        stdout.write("error: something is wrong\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(quality.subprocess, "run", fail)
    (tmp_path / "quality.md").write_text("the last good table")
    with pytest.raises(SystemExit) as exit:
        quality.main(["--methods", "adamw", "--corpora", "sotu", "--seeds", "0", "--lrs-adamw", "1e-3", "3e-3",
                      "--extend", "0", "--out", str(tmp_path)])
    assert exit.value.code not in (0, None) and "2 run(s) failed" in str(exit.value.code)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| AdamW")]
    assert len(rows) == 2 and all(row.split("|")[4].strip() == "failed" for row in rows), rows
    assert (tmp_path / "quality.md").read_text() == "the last good table"


def fake_result(ppl: float) -> dict:
    return {"final_val_ppl": ppl, "curve": [(0, 0.0, ppl + 1), (8, 1.0, ppl)], "train_seconds": 1.0,
            "block_linear_trainable_params": 10, "spectrum_drift": None}


def test_quality_takes_each_value_once_and_calls_a_single_lr_not_swept(bench, tmp_path, monkeypatch):
    quality = bench("quality")
    args = quality.parse_args(["--methods", "adamw", "adamw", "--corpora", "sotu", "sotu", "--seeds", "0", "1", "0",
                               "--lrs-adamw", "1e-3", "1e-3", "--out", str(tmp_path)])
    assert (args.methods, args.corpora, args.seeds, args.lrs_adamw) == (["adamw"], ["sotu"], [0, 1], [1e-3])
    monkeypatch.setattr(quality, "load", lambda spec, args: fake_result(50.0 + spec.seed))
    row = quality.table(args, "sotu", {"adamw": args.lrs_adamw}, {"adamw": 1e-3}).splitlines()[2]
    assert "(not swept)" in row and "edge" not in row and "50.50 ± 0.71" in row, row


@pytest.mark.parametrize(("seconds", "header"), [(0.25, "val ppl at 0.25 s"), (531.6, "val ppl at 532 s")])
def test_quality_names_the_equal_time_budget_to_its_precision(bench, tmp_path, monkeypatch, seconds, header):
    quality = bench("quality")
    args = quality.parse_args(["--methods", "adamw", "--corpora", "sotu", "--seeds", "0", "--out", str(tmp_path)])
    monkeypatch.setattr(quality, "load", lambda spec, args: {**fake_result(50.0), "train_seconds": seconds})
    assert header in quality.table(args, "sotu", {"adamw": [1e-3]}, {"adamw": 1e-3}).splitlines()[0]


def test_quality_reuses_a_run_whatever_its_out_is_called_and_names_what_differs(bench, tmp_path, monkeypatch):
    from poetlm.train.config import resolve_config

    quality = bench("quality")
    monkeypatch.chdir(tmp_path)
    args = quality.parse_args(["--methods", "adamw", "--corpora", "sotu", "--out", "q"])
    assert args.out == tmp_path / "q"
    spec = quality.Spec(quality.METHODS["adamw"], 1e-3, 0, "sotu")
    made = resolve_config(args.preset, [f"name='{spec.name}'", *quality.run_settings(spec, args)]).to_dict()
    made["data"]["cache_dir"] = "q/cache"  # as a run made with the relative spelling recorded it
    quality.run_dir(spec, args).mkdir(parents=True)
    (quality.run_dir(spec, args) / "config.json").write_text(json.dumps(made))
    assert quality.settings_mismatch(spec, args) is None
    made["data"]["seq_len"] += 1
    (quality.run_dir(spec, args) / "config.json").write_text(json.dumps(made))
    assert quality.settings_mismatch(spec, args) == "data.seq_len differ"
    (tmp_path / "texts.txt").write_text("words")  # a relative corpus path: the run records it absolute
    args = quality.parse_args(["--methods", "adamw", "--corpora", "texts.txt", "--out", "q"])
    spec = quality.Spec(quality.METHODS["adamw"], 1e-3, 0, "texts.txt")
    made = resolve_config(args.preset, [f"name='{spec.name}'", *quality.run_settings(spec, args)]).to_dict()
    made["data"]["data"] = str(tmp_path / "texts.txt")
    quality.run_dir(spec, args).mkdir(parents=True)
    (quality.run_dir(spec, args) / "config.json").write_text(json.dumps(made))
    assert quality.settings_mismatch(spec, args) is None


def test_quality_ablation_pins_exact_directions_where_the_docs_say_so(bench, tmp_path):
    from poetlm.train.config import resolve_config

    quality = bench("quality")
    args = quality.parse_args(["--ablation", "--out", str(tmp_path)])
    for key in ("abl-ortho", "abl-nesterov", "abl-alternate", "abl-transport"):
        spec = quality.Spec(quality.ABLATION[key], 0.04, 0, "sotu")
        config = resolve_config(args.preset, [f"name='{spec.name}'", *quality.run_settings(spec, args)])
        assert config.rule.orthogonalize == "exact" and config.poet.block_size == 32, key


# ---------------------------------------------------------------- finetune_sweep's bookkeeping


def fake_poetlm(calls: list, outcomes: dict):
    """A `poetlm` subprocess stand-in for finetune_sweep: finetunes named in `outcomes` diverge or fail."""

    def run(command, stdout, cwd, **_):
        sub, *rest = command[3:]
        calls.append(sub)
        name = rest[rest.index("--name") + 1] if "--name" in rest else None
        if outcomes.get(name) == "diverged":
            stdout.write("error: non-finite loss (nan) at step 3\n")
            return subprocess.CompletedProcess(command, 1)
        if outcomes.get(name) == "failed":
            stdout.write("error: out of memory\n")
            return subprocess.CompletedProcess(command, 1)
        if sub == "finetune":
            (pathlib.Path(cwd) / "runs" / name).mkdir(parents=True)
            (pathlib.Path(cwd) / "runs" / name / "summary.json").write_text(json.dumps(
                {"final_val_ppl": 20.0, "initial_val_ppl": 30.0, "block_linear_trainable_params": 10}))
        if sub == "eval":
            stdout.write("perplexity: 40.0\n")
        return subprocess.CompletedProcess(command, 0)

    return run


def test_finetune_sweep_records_a_failed_run_and_finishes_the_others(bench, tmp_path, monkeypatch):
    sweep = bench("finetune_sweep")
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", fake_poetlm(calls, {"lora-lr0.0003": "diverged",
                                                                      "lora-lr0.001": "failed"}))
    argv = ["--methods", "lora", "--out", str(tmp_path), "--plot", str(tmp_path / "plot.png")]
    for _ in range(2):  # the rerun keeps the divergence and the finished run, and retries the failure
        calls.clear()
        with pytest.raises(SystemExit) as exit:
            sweep.main(argv)
        assert "1 run(s) failed" in str(exit.value.code) and "lora-lr0.001" in str(exit.value.code)
        table = (tmp_path / "results.md").read_text()
        cells = [[cell.strip() for cell in row.split("|")[3:5]] for row in table.splitlines()[2:]]
        assert cells == [["diverged", "—"], ["failed", "—"], ["20.00", "40.00"]], table
    assert calls == ["finetune"]


def test_finetune_sweep_refuses_steps_finished_with_other_settings(bench, tmp_path, monkeypatch):
    sweep = bench("finetune_sweep")
    monkeypatch.setattr(sweep.subprocess, "run", fake_poetlm([], {}))
    argv = ["--methods", "lora", "--out", str(tmp_path), "--plot", str(tmp_path / "plot.png"), "--pretrain-steps", "4"]
    sweep.main(argv)
    for changed in (["--steps", "5"], ["--eval-tokens", "99"], ["--pretrain-steps", "5"]):
        with pytest.raises(SystemExit) as exit:
            sweep.main([*argv, *changed, "--report-only"])
        message = str(exit.value.code)
        assert "made with other settings" in message and changed[0][2:].replace("-", "_") in message, (changed, message)


def test_finetune_sweep_resolves_its_paths_for_the_subprocesses_it_runs_in_out(bench, tmp_path, monkeypatch):
    sweep = bench("finetune_sweep")
    monkeypatch.chdir(tmp_path)
    args = sweep.parse_args(["--out", "o", "--plot", "p.png", "--base-run", "b"])
    assert (args.out, args.plot, args.base_run) == (tmp_path / "o", tmp_path / "p.png", tmp_path / "b")
