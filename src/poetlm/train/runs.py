"""Loading what training produced: a run directory (config + checkpoint) or an exported HF model directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from torch import nn

from ..serialization import dtype_argument, load_dense
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, config_value, load_config
from .data import MODEL_TOKENIZER, RUN_TOKENIZER, DataError, load_tokenizer, split_hf_spec
from .methods import prepare_model
from .models import ModelError, load_model


def data_options(config: TrainConfig) -> dict:
    """prepare_data's settings for the data of a run."""
    d = config.data
    return {"vocab_size": d.vocab_size, "cache_root": Path(d.cache_dir).expanduser(), "val_fraction": d.val_fraction,
            "split_seed": d.resolved_split_seed(config.seed), "max_documents": d.max_documents}


# What may differ between a run's sessions: where its files are, how it is watched, what executes it, and how
# many steps it takes (extending a run). Every other key defines what the run trains (model, data windows,
# optimizer, schedule) or measures (eval_tokens), and a checkpoint is resumed only under its own values.
RESUME_ADJUSTABLE = {"name", "out_dir", "steps", "eval_every", "log_every", "diagnostics_every", "checkpoint_every",
                     "keep_checkpoints", "progress", "device", "dtype", "parallel", "activation_checkpointing", "compile",
                     "data.data", "data.cache_dir", "data.tokenizer", "finetune.base_model"}


# Of those, the files a resume may find elsewhere (recorded absolute, as a new run records them).
MOVABLE_PLACES = ("data.data", "data.cache_dir", "finetune.base_model")


# Of those, the keys that only place a new run (name, out_dir) or pick the tokenizer it trains (data.tokenizer):
# a resumed run goes on in its directory with its own tokenizer, so a resume may not record other values.
FIXED_ON_RESUME = ("name", "out_dir", "data.tokenizer")


def refuse_new_places(recorded: TrainConfig, config: TrainConfig, run_dir: Path) -> None:
    """Refuse a resume's --name, --out or --tokenizer that differ from the run's: config.json would record what
    the run does not do (report.md would label it by the new name, the tokenizer would name one it never used)."""
    def place(value):  # the same directory however it is written (relative, ~, absolute)
        return None if value is None else Path(str(value)).expanduser().resolve()

    for key in FIXED_ON_RESUME:
        before, after = config_value(recorded, key), config_value(config, key)
        if place(before) == place(after):
            continue
        if key == "data.tokenizer":
            raise ConfigError(f"--resume goes on with the run's own tokenizer ({run_dir / 'tokenizer'}), so it cannot take "
                              f"data.tokenizer={after!r}: drop --tokenizer (a new tokenizer needs a new run)")
        raise ConfigError(f"--resume goes on in {run_dir}, so it cannot take {key}={after!r}, which places a new run: drop "
                          "--name / --out (to rename or move a run, move its directory)")


def absolute_places(config: TrainConfig) -> TrainConfig:
    """`config` with its relative local paths made absolute, as config.json records them: a resume, eval or
    export may start from another directory, where they would name other files, or none (and a relative
    cache directory would silently tokenize everything again there). Names of bundled corpora and hub ids
    stay as they are, and so do paths under ~."""
    def local(value: str | None, must_exist: bool = True) -> str | None:
        if value is None or value.startswith("~") or Path(value).is_absolute() or must_exist and not Path(value).exists():
            return value
        return str(Path(value).resolve())

    data = config.data.data
    if data.startswith("hf:") and not data.startswith("hf:~"):
        name, dataset_config = split_hf_spec(data[3:])
        if Path(name).is_dir():
            data = f"hf:{local(name)}" + (f":{dataset_config}" if dataset_config else "")
    else:
        data = local(data)
    return dataclasses.replace(
        config, out_dir=local(config.out_dir, must_exist=False),
        data=dataclasses.replace(config.data, data=data, tokenizer=local(config.data.tokenizer),
                                 cache_dir=local(config.data.cache_dir, must_exist=False)),
        finetune=dataclasses.replace(config.finetune, base_model=local(config.finetune.base_model)),
        model=dataclasses.replace(config.model, hf_config=local(config.model.hf_config)))


def check_steps(config: TrainConfig, checkpoint: Path) -> None:
    """Refuse a `steps` below the step a resumed checkpoint is at: the run would go on past its own end (or
    stop there, with config.json and summary.json disagreeing on its length)."""
    step = int(ckpt.CHECKPOINT_PATTERN.search(checkpoint.name).group(1))
    if config.steps < step:
        raise ConfigError(f"steps={config.steps} is below step {step}, where this run's checkpoint {checkpoint.name} is: a run "
                          f"cannot be shortened. Resume with steps of at least {step} (steps={step} ends it there)")


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def _record_digest(run_dir: Path) -> str | None:
    """sha256 of the run's data.json (its tokens and the run's own id); None where it is missing or unreadable."""
    try:
        record = json.loads((run_dir / "data.json").read_text())
    except (OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def run_identity(config: TrainConfig, run_dir: Path) -> dict:
    """What a checkpoint records of the run that wrote it: the config values that define the run (as config.json
    reads them back) and a digest of its data.json."""
    values = _flatten(json.loads(json.dumps(config.to_dict())))
    defining = {key: value for key, value in values.items()
                if key not in RESUME_ADJUSTABLE and not key.startswith("logging.")}
    return {"config": defining, "data": _record_digest(Path(run_dir))}


def check_identity(saved: dict, identity: dict, run_dir: Path) -> None:
    """Refuse a checkpoint of another run, or one that config.json no longer describes. Checkpoints written
    before they recorded their run carry no identity and are taken as they are."""
    recorded, path = saved.get("run"), saved["path"]
    if recorded is None:
        return
    if None not in (recorded["data"], identity["data"]) and recorded["data"] != identity["data"]:
        raise ckpt.CheckpointError(f"{path} belongs to another run: it was not written for {run_dir}'s data.json. "
                                   f"Remove it from {path.parent} (this run resumes from its own newest checkpoint)")
    theirs, ours = recorded["config"], identity["config"]
    # A key only one side knows came or went with a poetlm version; its default keeps the old behaviour.
    changed = sorted(key for key in theirs.keys() & ours.keys() if theirs[key] != ours[key])
    if changed:
        shown = ", ".join(f"{key} {theirs[key]!r} → {ours[key]!r}" for key in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ckpt.CheckpointError(
            f"{run_dir / 'config.json'} changed since {path.name} was written ({shown}{more}): a run goes on only with the "
            "settings it was trained with. Restore those values (a resume may change steps and bookkeeping such as "
            "eval_every or device, docs/design.md), or start a new run with them")


def final_model_dir(run_dir: Path, use: str) -> Path | None:
    """run_dir/final/, the trained model of a finished run, announced as what `use` takes; None if there is none."""
    final = run_dir / "final"
    if not final.is_dir():
        return None
    print(f"poetlm: note: {use} {final}, the trained model of run {run_dir}", file=sys.stderr)
    return final


def load_run_model(run_dir: Path, device="cpu") -> tuple[nn.Module, object, TrainConfig]:
    """The model of the newest checkpoint of a run (POET layers included) and its tokenizer; the model in
    final/ if the checkpoints are gone, or if the run finished at its newest checkpoint and that is damaged (an
    older one would be another, earlier model)."""
    config = load_config(run_dir / "config.json")
    checkpoints = ckpt.list_checkpoints(run_dir)
    if not checkpoints and (final := final_model_dir(run_dir, "no checkpoint left: loading")):
        return *load_model_dir(final, device), config
    # final/ is the newest checkpoint's model when the run finished at that step (not one extended since)
    finished_there = bool(checkpoints) and (run_dir / "final").is_dir() and _summary_steps(run_dir) == ckpt.checkpoint_step(checkpoints[-1])
    tokenizer = load_tokenizer(run_dir / "tokenizer", hint=RUN_TOKENIZER)
    try:
        state = ckpt.load_checkpoint(run_dir, map_location=device, older=not finished_there)
    except ckpt.NewestDamaged as damage:
        final = final_model_dir(run_dir, f"{damage}; loading instead")
        return *load_model_dir(final, device), config
    check_identity(state, run_identity(config, run_dir), run_dir)
    model = prepare_model(_run_architecture(config, run_dir, tokenizer), config)
    with ckpt.restoring(state["path"]):
        model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, config


def _summary_steps(run_dir: Path) -> int | None:
    """The steps summary.json says the run finished with; None without a readable one."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return None


def _run_architecture(config: TrainConfig, run_dir: Path, tokenizer) -> nn.Module:
    """The model a run's checkpoint loads into. A finetune's is its base model's; with the base gone, a finished
    run's final/config.json describes the same architecture, and the checkpoint holds every weight (the base's
    frozen ones too), so the base is not needed."""
    try:
        return load_model(config, tokenizer, run_dir)
    except ModelError:
        final = run_dir / "final"
        if not (config.finetuning and (final / "config.json").is_file()):
            raise
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"poetlm: note: the base model {config.finetune.base_model} cannot be loaded; building the run's "
          f"architecture from {final / 'config.json'}, with the checkpoint's weights", file=sys.stderr)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final), **dtype_argument(torch.float32))


def load_model_dir(path: Path, device="cpu") -> tuple[nn.Module, object]:
    """A directory that transformers can load (e.g. one written by `poetlm export`) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = load_dense(AutoModelForCausalLM, path)
    return model.to(device).eval(), load_tokenizer(path, hint=MODEL_TOKENIZER)


def load_any_model(path: str | Path, device="cpu") -> tuple[nn.Module, object, TrainConfig | None]:
    """A run directory, or a model directory (load_model_dir)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory: give a run directory (runs/NAME) or an exported model directory")
    if ckpt.is_run_dir(path):
        return load_run_model(path, device)
    if not (path / "config.json").is_file():
        raise DataError(f"{path} is neither a poetlm run directory (config.json + data.json) nor a model directory (config.json + weights)")
    return *load_model_dir(path, device), None
