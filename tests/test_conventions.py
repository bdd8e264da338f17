"""CLI and logging conventions: config descriptions and --print-config, progress off a terminal, metric
backends (and loud warnings when one is missing), the final/ Hugging Face directory, Muon and the
spectrum plot on any architecture."""

import dataclasses
import io
import json
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from poetlm.cli import main
from poetlm.train import loop, metrics
from poetlm.train.config import TrainConfig, resolve_config, save_config
from poetlm.train.config_text import config_keys, describe_config, field_descriptions, to_toml
from poetlm.train.methods import make_method
from poetlm.train.models import build_model
from poetlm.train.parallel import Runtime
from poetlm.train.progress import BarProgress, LineProgress
from poetlm.train.runs import load_run_model

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
        "data.seq_len=32", "data.vocab_size=300", "batch_size=4", "eval_tokens=256", "poet.block_size=8",
        "optim.warmup_steps=0", "steps=4", "eval_every=2", "checkpoint_every=2", "log_every=2", "diagnostics_every=2"]


def config_classes(cls=TrainConfig) -> list[type]:
    """TrainConfig and the dataclasses of its sections."""
    hints = typing.get_type_hints(cls)
    return [cls] + [c for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name]) for c in config_classes(hints[f.name])]


def test_every_config_key_has_a_one_line_description():
    classes = config_classes()
    assert {c.__name__ for c in classes} >= {"TrainConfig", "ModelConfig", "DataConfig", "OptimConfig", "FinetuneConfig",
                                             "POETConfig", "RuleConfig", "LoggingConfig"}
    for cls in classes:
        described = field_descriptions(cls)
        for f in dataclasses.fields(cls):
            text = described.get(f.name, "")
            assert text.strip() and "\n" not in text, f"{cls.__name__}.{f.name} has no description"
    listing = describe_config()
    for key, _, text in config_keys():
        assert any(line.split()[:1] == [key] and line.rstrip().endswith(text) for line in listing.splitlines()), key


def test_poetlm_config_lists_the_keys(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr_poet" in out and "radians per step" in out and "[logging]" in out
    assert "rule.eps" in out and "denominator" in out and "Adam's second moment" in out  # docstring entries


def test_keys_that_can_be_null_default_to_null():
    """TOML has no null, so --print-config leaves unset keys out: reading back must give None again."""
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(hints[f.name]):
                assert f.default is None, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", []),
    ("tiny", ["method='poet-paper'"]),  # the method's own preset table and the paper's k, resolved
    ("llama-60m", ["method='muon'", "optim.lr_muon=0.02", "model.num_kv_heads=2"]),
    ("finetune", ["finetune.base_model='some/model'", "method='lora'", "finetune.lora_targets=['q_proj', 'v_proj']",
                  "poet.exclude_modules=['mlp.down_proj']", "logging.wandb=true", "logging.wandb_mode='offline'"]),
    ("tiny", ["poet.target_modules='.*(q|v)_proj$'", "name='quote \" back\\\\slash ü\\t'", "optim.min_lr_ratio=0",
              "data.data='C:\\\\data\\\\c4'", "rule.name='lie_adam'"]),
])
def test_print_config_is_toml_that_reads_back_as_the_same_config(preset, overrides, tmp_path, capsys):
    config = resolve_config(preset, overrides)
    assert main(["train", "--config", preset, "--print-config", *overrides]) == 0
    text = capsys.readouterr().out
    assert text == to_toml(config)
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    assert resolve_config(str(path)) == config
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    if preset == "finetune":  # finetune has the flag too
        assert main(["finetune", "--model", "some/model", "--data", "sotu", "--print-config", *overrides]) == 0
        assert resolve_config(str(path)) == resolve_config("finetune", [("finetune.base_model", "some/model"), *overrides])
        capsys.readouterr()


def test_print_config_of_a_run_to_resume(tmp_path, capsys):
    config = resolve_config("tiny", ["steps=7"])
    save_config(config, tmp_path / "config.json")
    assert main(["train", "--resume", str(tmp_path), "--print-config"]) == 0
    (tmp_path / "printed.toml").write_text(capsys.readouterr().out)
    assert resolve_config(str(tmp_path / "printed.toml")) == config


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    config, runtime = resolve_config("tiny", ["steps=4", "log_every=2"]), Runtime(0, 1, 0, torch.device("cpu"))
    records = [{"step": 1, "loss": 5.0, "lr": 0.01, "lr_poet": 0.04},
               {"step": 2, "loss": 4.5, "lr": 0.009, "lr_poet": 0.036, "tokens_per_s": 8123.4, "spectrum_drift": 2.1e-6},
               {"step": 3, "loss": 4.25, "lr": 0.008, "lr_poet": 0.032},
               {"step": 4, "loss": 4.125, "lr": 0.007, "lr_poet": 0.028, "tokens_per_s": 8000.0}]
    evals = [None, {"val_ppl": 123.44, "step": 1}, {"val_ppl": 123.44, "step": 1}, {"val_ppl": 99.0, "step": 4}]
    outputs = {}
    for tty in (False, True):
        stream = Stream(tty)
        progress = loop._progress(config, runtime, 0, stream=stream)
        assert isinstance(progress, BarProgress if tty else LineProgress)
        for record, last_eval in zip(records, evals):
            progress.step(record, last_eval, logged="tokens_per_s" in record)
        progress.close()
        outputs[tty] = stream.getvalue()
    assert outputs[False].splitlines() == [
        "step 2/4 | loss 4.500 | lr 9.0e-03 | lr_poet 3.6e-02 | tok/s 8123 | val_ppl 123.4 (step 1) | drift 2.1e-06",
        "step 4/4 | loss 4.125 | lr 7.0e-03 | lr_poet 2.8e-02 | tok/s 8000 | val_ppl 99.0 | drift 2.1e-06"]
    assert "\r" not in outputs[False]
    assert "\r" in outputs[True] and "4/4" in outputs[True] and "val_ppl=99.00" in outputs[True]
    assert loop._progress(resolve_config("tiny", ["progress=false"]), runtime, 0, stream=Stream(False)) is None
    assert loop._progress(config, Runtime(1, 2, 1, torch.device("cpu")), 0, stream=Stream(False)) is None


@pytest.fixture
def tiny(tmp_path, corpus):
    def overrides(*extra):
        return TINY + [f"data.data={str(corpus)!r}", f"data.cache_dir={str(corpus.parent / 'cache')!r}",
                       f"out_dir={str(tmp_path / 'runs')!r}", *extra]
    return overrides


def test_a_run_off_a_terminal_prints_lines_and_writes_tensorboard_and_final(tiny, capsys):
    assert main(["train", *tiny("name='plain'", "method='poet'")]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "lr_poet" in lines[0] and "val_ppl" in lines[0] and "drift" in lines[1] and "\r" not in captured.err
    run_dir = Path(captured.out.split("run directory: ")[1].split(" (")[0])
    assert str(run_dir / "final") in captured.out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4] and [e.step for e in events.Scalars("val_ppl")] == [2, 4]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_model, tokenizer, _ = load_run_model(run_dir)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    ids = AutoTokenizer.from_pretrained(run_dir / "final")("To be, or not to be", return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer("To be, or not to be", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(final(ids).logits, run_model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_missing_backends_are_a_warning_once_never_silence(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(metrics, "_warned", set())
    config = resolve_config("tiny", ["logging.wandb=true"])
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        logger = metrics.MetricsLogger(tmp_path / run, config=config)
        logger.log({"step": 1, "loss": 2.0})
        logger.close()
        assert json.loads((tmp_path / run / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    err = capsys.readouterr().err
    assert err.count("TensorBoard is not installed") == 1 and err.count("wandb is not installed") == 1
    assert "pip install tensorboard" in err and "pip install 'poetlm[wandb]'" in err and "logging.wandb=false" in err
    quiet = resolve_config("tiny", ["logging.tensorboard=false"])
    monkeypatch.setattr(metrics, "_warned", set())
    metrics.MetricsLogger(tmp_path / "a", config=quiet).close()
    assert capsys.readouterr().err == ""  # switched off: nothing to warn about


def test_a_wandb_run_that_cannot_start_is_a_warning(tmp_path, monkeypatch, capsys):
    class WandbError(Exception):
        pass

    def init(**kwargs):
        raise WandbError("api_key not configured (no-tty)")

    fake = types.ModuleType("wandb")
    fake.init, fake.errors = init, types.SimpleNamespace(Error=WandbError)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(metrics, "_warned", set())
    logger = metrics.MetricsLogger(tmp_path, config=resolve_config("tiny", ["logging.wandb=true", "logging.tensorboard=false"]))
    logger.log({"step": 1, "loss": 2.0})
    logger.close()
    err = capsys.readouterr().err
    assert "could not start a Weights & Biases run (api_key not configured (no-tty))" in err and "wandb_mode='offline'" in err
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 2.0}'


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    config = resolve_config("tiny", ["logging.wandb=true", "logging.tensorboard=false", "name='wb'"])
    logger = metrics.MetricsLogger(tmp_path, config=config)
    logger.log({"step": 10, "tokens": 100, "loss": 4.5, "lr": 0.01})
    logger.log({"step": 10, "tokens": 100, "val_ppl": 90.0, "val_loss": 4.5})
    logger.close()
    wandb.teardown()  # waits for W&B's service process, which writes the offline log after finish() returns
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    [log] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert b"val_ppl" in log.read_bytes() and b"wb" in log.read_bytes()
    resumed = metrics.MetricsLogger(tmp_path, resume_step=10, config=config)
    assert resumed._wandb.id == run_id  # a resumed run continues its own W&B run
    resumed.close()


def test_muon_and_the_spectrum_plot_find_the_block_matrices_of_gpt2():
    for source, last in ((None, "model.layers.1.mlp.down_proj"), ("gpt2", "transformer.h.1.mlp.c_proj")):
        config = resolve_config("tiny", [*TINY, "method='muon'", *([f"model.hf_config={source!r}"] if source else [])])
        model = build_model(config.model, 300, 32)
        muon, adamw = make_method(config).optimizers(model)
        matrices = {id(p) for g in muon.param_groups for p in g["params"]}
        names = [n for n, p in model.named_parameters() if id(p) in matrices]
        assert len(names) == 2 * (7 if source is None else 4), names
        assert not matrices & {id(p) for g in adamw.param_groups for p in g["params"]}
        assert loop.spectrum_layer(model)[0] == last


@pytest.mark.parametrize(("version", "kept"), [("2.13.0+cpu", True), ("2.6.0", True), ("2.6.0a0+gitabc", True), ("2.5.1+cu121", False)])
def test_the_setup_keeps_a_recent_torch_and_refuses_an_old_one_rather_than_let_pip_replace_it(tmp_path, version, kept):
    """`make setup` must never install torch where one is (a GPU user's build), nor leave an older one that
    `pip install -e .` (torch>=2.6) would silently swap for the newest, multi-GB CUDA build."""
    import subprocess

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    python = tmp_path / "python"
    # A Python whose torch is the fake one; its pip must never run
    python.write_text(f'#!/bin/sh\n[ "$1" = "-m" ] && exit 99\nPYTHONPATH={tmp_path} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    result = subprocess.run(["bash", "scripts/install_torch.sh", str(python)], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert (result.returncode == 0) == kept, result.stderr
    assert kept or f"torch {version} in" in result.stderr and "older than 2.6" in result.stderr
