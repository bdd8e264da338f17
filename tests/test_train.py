"""End-to-end runs of `poetlm train` and friends on tiny configs (seconds each)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import poetlm
from poetlm.cli import main
from poetlm.train import loop
from poetlm.train.config import ConfigError, resolve_config
from poetlm.train.runs import load_run_model

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
        "data.seq_len=32", "data.vocab_size=300", "batch_size=4", "eval_tokens=512", "log_every=1",
        "diagnostics_every=1", "poet.block_size=8", "poet.merge_every=2", "progress=false", "optim.warmup_steps=0"]


@pytest.fixture
def tiny(tmp_path, corpus):
    cache = corpus.parent / "cache"  # shared: the tokenizer and token cache are built once per module

    def overrides(*extra, steps=6):
        return TINY + [f"data.data={str(corpus)!r}", f"data.cache_dir={str(cache)!r}",
                       f"out_dir={str(tmp_path / 'runs')!r}", f"steps={steps}", "eval_every=3", "checkpoint_every=3", *extra]
    return overrides


def metrics(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_ppl" in r]


@pytest.mark.parametrize("method,extra", [
    ("poet-paper", ["poet.variant='bs'"]),
    ("poet-paper", ["poet.variant='fs'", "poet.fraction=0.5"]),
    ("poet", ["poet.variant='bs'"]),
    ("poet", ["poet.variant='fs'", "poet.fraction=0.5", "rule.name='lie_adam'"]),
    ("adamw", []),
    ("muon", []),
])
def test_each_method_trains_and_writes_a_complete_run(tiny, method, extra):
    config = resolve_config("tiny", tiny(f"method={method!r}", f"name={method!r}", "optim.lr=1e-2", "optim.lr_poet=1e-2", *extra, steps=8))
    summary = loop.train(config)
    run_dir = Path(summary["run_dir"])
    train_lines, eval_lines = metrics(run_dir)
    assert [r["step"] for r in train_lines] == list(range(1, 9))
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert summary["final_val_ppl"] == pytest.approx(eval_lines[-1]["val_ppl"])
    for name in ("config.json", "summary.json", "spectrum.json", "report.md", "loss.png", "tokenizer/tokenizer.json"):
        assert (run_dir / name).exists(), name
    # final/: a plain Hugging Face directory with the run's function (poet-paper's layers merged into dense weights).
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 16))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert not any(isinstance(m, poetlm.POETLinear) for m in final.modules()) and (run_dir / "final" / "tokenizer.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(final(ids).logits, load_run_model(run_dir)[0](ids).logits, rtol=1e-5, atol=1e-5)
    if method == "poet-paper":
        assert {"q_norm", "orth_err", "probe_cos", "spectrum_drift"} <= set(train_lines[-1])
        model, _, _ = load_run_model(run_dir)
        assert summary["block_linear_trainable_params"] == sum(p.numel() for p in poetlm.rotation_parameters(model))
        assert all(int(layer.merge_count) == 3 for _, layer in poetlm.poet_layers(model))  # merges at steps 2, 4, 6
    if method == "poet":
        # Rotations only: every block linear keeps the spectrum of the W0 the layer form would have drawn.
        model, _, config = load_run_model(run_dir)
        assert summary["spectrum_drift"] < 1e-5 and train_lines[-1]["spectrum_drift"] < 1e-5
        start = poetlm.POETLinear(32, 64, bias=False, config=poetlm.POETConfig(**{**config.poet.to_dict()}),
                                  name="model.layers.1.mlp.up_proj").weight0
        up = model.model.layers[1].mlp.up_proj.weight.detach()
        assert (up - start).norm() > 1e-3
        torch.testing.assert_close(torch.linalg.svdvals(up), torch.linalg.svdvals(start), atol=1e-5, rtol=0)
        poet = config.poet
        shapes = [(32, 32)] * 4 + [(64, 32), (64, 32), (32, 64)]
        expected = sum(s * (s - 1) // 2 for shape in shapes for d in shape
                       for s in poetlm.primitives.block_layout(poet.variant, d, poet.block_size, poet.fraction)[1])
        assert summary["block_linear_trainable_params"] == 2 * expected
    if method in ("adamw", "muon"):
        assert summary["block_linear_trainable_params"] == 2 * (4 * 32 * 32 + 3 * 32 * 64)


@pytest.mark.slow
def test_default_demo_path_on_the_bundled_corpus(tmp_path, capsys):
    code = main(["train", "--steps", "2", "--out", str(tmp_path / "runs"), "--no-progress", "eval_tokens=1024",
                 "data.max_documents=40", f"data.cache_dir={str(tmp_path / 'cache')!r}", "model.num_layers=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "final validation perplexity:" in out
    config = json.loads((tmp_path / "runs" / "tiny-poet" / "config.json").read_text())
    assert config["method"] == "poet" and config["data"]["data"] == "sotu" and config["steps"] == 2


def _signal_at(monkeypatch, step, signum):
    """Deliver a real signal to this process while the loop runs `step`."""
    original = loop.micro_batch_loss
    calls = {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "micro_batch_loss", loss_then_signal)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny, monkeypatch, capsys):
    full = loop.train(resolve_config("tiny", tiny("name='full'", "grad_accum=2", steps=9)))
    _signal_at(monkeypatch, step=2 * 5, signum=signal.SIGTERM)  # second micro-batch of step 5: between checkpoints
    config = resolve_config("tiny", tiny("name='cut'", "grad_accum=2", steps=9))
    stopped = loop.train(config)
    assert stopped["interrupted"] and stopped["step"] == 5
    assert "Resume with: poetlm train --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--resume", stopped["run_dir"]]) == 0
    full_train, full_eval = metrics(full["run_dir"])
    cut_train, cut_eval = metrics(stopped["run_dir"])
    assert [r["loss"] for r in cut_train] == [r["loss"] for r in full_train]
    assert [r["val_ppl"] for r in cut_eval] == [r["val_ppl"] for r in full_eval]
    a, _, _ = load_run_model(Path(full["run_dir"]))
    b, _, _ = load_run_model(Path(stopped["run_dir"]))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_sigint_from_outside_writes_a_checkpoint_and_exits_cleanly(tiny, tmp_path):
    args = [sys.executable, "-m", "poetlm", "train", *tiny("name='sig'", steps=100000), "checkpoint_every=100000", "eval_every=100000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "runs" / "sig" / "metrics.jsonl"
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert "Traceback" not in err and "SIGINT received" in err
    checkpoints = list((tmp_path / "runs" / "sig" / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("spoil,message", [
    (lambda loss: loss * float("nan"), "non-finite loss (nan) at step 5"),
    (_NanGradient.apply, "non-finite gradient norm (nan) at step 5"),
])
def test_non_finite_loss_or_gradient_stops_with_the_step_and_keeps_a_good_checkpoint(tiny, monkeypatch, capsys, spoil, message):
    original = loop.micro_batch_loss
    calls = {"n": 0}

    def spoiled_from_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return spoil(loss) if calls["n"] >= 5 else loss

    monkeypatch.setattr(loop, "micro_batch_loss", spoiled_from_step_5)
    code = main(["train", *tiny("name='nan'")])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "step_00000003.pt" in err
    kept = torch.load(Path(err.split("checkpoint is ")[1].split(")")[0]), weights_only=False)
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())


def test_export_round_trip_and_eval_generate_report(tiny, tmp_path, capsys):
    summary = loop.train(resolve_config("tiny", tiny("name='exp'")))
    run_dir = Path(summary["run_dir"])
    poet_model, _, _ = load_run_model(run_dir)
    assert main(["export", str(run_dir), str(tmp_path / "dense")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(dense(ids).logits, poet_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, poetlm.POETLinear) for m in dense.modules())

    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity:")[1].split()[0])
    assert ppl == pytest.approx(summary["final_val_ppl"], rel=1e-3)
    assert main(["eval", str(tmp_path / "dense"), "--data", json.loads((run_dir / "config.json").read_text())["data"]["data"],
                 "--tokens", "512", "--seq-len", "32"]) == 0
    dense_ppl = float(capsys.readouterr().out.split("perplexity:")[1].split()[0])
    assert dense_ppl == pytest.approx(ppl, rel=1e-3)
    assert main(["generate", str(run_dir), "--prompt", "To be", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    # The saved model's special tokens are the tokenizer's end-of-text, where documents end in training (not
    # LLaMA's defaults 1 and 2: byte tokens of poetlm's tokenizer, at which generation used to stop)
    eos = AutoTokenizer.from_pretrained(tmp_path / "dense").eos_token_id
    for directory in (run_dir / "final", tmp_path / "dense"):
        for name in ("config.json", "generation_config.json"):
            saved = json.loads((directory / name).read_text())
            assert [saved[f"{kind}_token_id"] for kind in ("bos", "eos", "pad")] == [eos] * 3, (directory, name)
    other = loop.train(resolve_config("tiny", tiny("name='exp-adamw'", "method='adamw'")))
    assert main(["report", str(run_dir), other["run_dir"], "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "POET-BS b=8" in report and "AdamW" in report


def test_config_errors_name_the_key(tiny, capsys):
    assert main(["train", *tiny("optim.lrr=1")]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", *tiny("steps=0")]) == 2
    assert "steps=0" in capsys.readouterr().err
    assert main(["train", *tiny("poet.variant='xx'")]) == 2
    assert "POETConfig.variant='xx'" in capsys.readouterr().err
    assert main(["train", *tiny("batch_size='four'")]) == 2
    assert "batch_size='four'" in capsys.readouterr().err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "tiny" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not of the form"):
        resolve_config("tiny", ["optim.lr"])


def test_data_and_resume_errors(tiny, tmp_path, capsys):
    assert main(["train", *tiny(f"data.data={str(tmp_path / 'missing.txt')!r}")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["train", *tiny(f"data.data={str(tmp_path / 'empty.txt')!r}")]) == 1
    assert "empty.txt" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    # The shortcut flags are overrides too: a resumed run must not silently ignore those it cannot change.
    assert main(["train", "--resume", str(tmp_path), "--steps", "100", "--data", "shakespeare", "--method", "adamw", "seed=5"]) == 2
    assert "--resume cannot change method, seed: " in capsys.readouterr().err


def test_settings_that_fail_only_at_run_time_are_one_line_errors_naming_the_key(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", *tiny("poet.variant='fs'", "poet.fraction=0.01")]) == 1  # the fold form, as the layer form says it
    assert "nothing POET can rotate with variant='fs', fraction=0.01" in capsys.readouterr().err
    for key in ("data.cache_dir", "out_dir"):  # a directory under a file; the file itself
        for path in (tmp_path / "file" / "below", tmp_path / "file"):
            assert main(["train", *tiny(f"{key}={str(path)!r}")]) == 2
            assert f"config error: {key}={str(path)!r} cannot be made a directory" in capsys.readouterr().err


def test_a_validation_set_too_small_is_refused_before_the_first_step(tiny, tmp_path, capsys):
    assert main(["train", *tiny("eval_tokens=10", "name='small-eval'")]) == 1
    err = capsys.readouterr().err
    assert "validation token budget 10 is smaller than seq_len=32" in err and "eval_tokens" in err
    assert not (tmp_path / "runs" / "small-eval").exists()  # removed: it never trained a step


def test_cli_arguments_out_of_range_are_usage_errors(capsys):
    for argv in (["generate", "run", "--max-new-tokens", "0"], ["generate", "run", "--top-k", "-3"],
                 ["generate", "run", "--temperature", "-1"], ["eval", "run", "--batch-size", "0"],
                 ["eval", "run", "--tokens", "0"], ["eval", "run", "--tokens", "many"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "argument --" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "NaN", "Infinity"])
def test_generate_refuses_a_temperature_that_is_no_finite_number(value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "run", "--temperature", value])
    assert stop.value.code == 2
    assert f"argument --temperature: {value!r} is not a finite number: use a value of at least 0.0" in capsys.readouterr().err


def test_run_names_stay_under_out_dir_and_learning_rates_are_finite():
    with pytest.raises(ConfigError, match="name='../../etc' is invalid: must be a plain directory name"):
        resolve_config("tiny", ["name='../../etc'"])
    with pytest.raises(ConfigError, match="optim.lr=inf is invalid: must be a finite number"):
        resolve_config("tiny", ["optim.lr=inf"])


@pytest.mark.parametrize("data", ["plain", "hf"])
def test_relative_places_are_recorded_absolute_so_a_resume_may_start_elsewhere(tmp_path, corpus, monkeypatch, data):
    """A relative --data, hf:DIR, cache or out directory names other files (or none) from another directory."""
    work = tmp_path / "work"
    (work / "texts").mkdir(parents=True)
    (work / "texts" / "train.txt").write_text(corpus.read_text())
    monkeypatch.chdir(work)
    source = "texts/train.txt" if data == "plain" else "hf:texts"
    assert main(["train", "--data", source, "--out", "runs", "--name", "r", *TINY, "steps=6", "eval_every=3",
                 "checkpoint_every=3", "data.cache_dir='cache'"]) == 0
    recorded = json.loads((work / "runs" / "r" / "config.json").read_text())
    assert recorded["data"]["data"] == (str(work / "texts" / "train.txt") if data == "plain" else f"hf:{work / 'texts'}")
    assert recorded["data"]["cache_dir"] == str(work / "cache") and recorded["out_dir"] == str(work / "runs")
    assert str(work / "cache") in (work / "runs" / "r" / "data.json").read_text()
    shutil.rmtree(work / "runs" / "r" / "final")  # resume the last steps again, from elsewhere, on the same cache
    for last in (work / "runs" / "r" / "checkpoints").glob("step_00000006*"):
        last.unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(work / "runs" / "r"), "--no-progress"]) == 0
    assert not (tmp_path / "cache").exists()  # no second tokenization into a cache of that name here
    monkeypatch.chdir(work)  # a resume that names the data again, relative, records it as a new run would
    assert main(["train", "--resume", "runs/r", "--data", source, "steps=7", "--no-progress"]) == 0
    assert json.loads((work / "runs" / "r" / "config.json").read_text())["data"]["data"] == recorded["data"]["data"]


def test_a_resume_on_another_number_of_processes_keeps_the_global_batch(capsys):
    from poetlm.train.parallel import Runtime

    config = resolve_config("tiny", ["grad_accum=2"])
    state = loop.TrainState(step=5, micro_batches=4)  # 4 processes × grad_accum 1, or 2 × 2, …
    one = Runtime(0, 1, 0, torch.device("cpu"))
    assert loop.keep_global_batch(config, state, one).grad_accum == 4
    assert "grad_accum 2 → 4 keeps the run's 64 sequences per step" in capsys.readouterr().err
    assert loop.keep_global_batch(config, loop.TrainState(micro_batches=2), one) is config
    with pytest.raises(ConfigError, match="3 processes cannot share evenly"):
        loop.keep_global_batch(config, state, Runtime(0, 3, 0, torch.device("cpu")))


def test_eval_of_a_bf16_run_scores_it_as_the_run_did(tiny, capsys):
    summary = loop.train(resolve_config("tiny", tiny("name='bf16'", "dtype='bf16'", steps=3)))
    capsys.readouterr()
    assert main(["eval", summary["run_dir"]]) == 0
    assert float(capsys.readouterr().out.split("perplexity:")[1].split()[0]) == pytest.approx(summary["final_val_ppl"], rel=1e-5)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny, capsys):
    summary = loop.train(resolve_config("tiny", tiny("name='corrupt'", "keep_checkpoints=2", steps=6)))
    run_dir = Path(summary["run_dir"])
    newest = run_dir / "checkpoints" / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    model, _, _ = load_run_model(run_dir)  # loads step 3 instead of failing
    assert all(int(layer.merge_count) == 1 for _, layer in poetlm.poet_layers(model))


def test_a_resume_extends_a_run_with_more_steps_on_another_device_setting(tiny, capsys):
    first = loop.train(resolve_config("tiny", tiny(steps=3)))
    assert main(["train", "--resume", first["run_dir"], "steps=5", "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((Path(first["run_dir"]) / "config.json").read_text())["steps"] == 5
    assert [r["step"] for r in metrics(first["run_dir"])[1]][-1] == 5


def test_a_report_that_fails_does_not_fail_the_finished_run(tiny, monkeypatch, capsys):
    """Everything the run made is on disk before its report; a plot library's error there (matplotlib overflowed
    on a diverged run's 1e288 perplexity) used to fail the run, and every resume of it, at the very end."""
    def broken(*args):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(loop, "write_report", broken)
    summary = loop.train(resolve_config("tiny", tiny("name='unreported'", steps=3)))
    assert summary["steps"] == 3 and (Path(summary["run_dir"]) / "final").is_dir()
    assert "report.md was not written (OverflowError" in capsys.readouterr().err
