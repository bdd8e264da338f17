"""Loading what training produced: a run directory (config + checkpoint) or an exported HF model directory."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from ..serialization import load_dense
from . import checkpoint as ckpt
from .config import TrainConfig, load_config
from .data import MODEL_TOKENIZER, RUN_TOKENIZER, DataError, load_tokenizer
from .methods import prepare_model
from .models import load_model


def data_options(config: TrainConfig) -> dict:
    """prepare_data's settings for the data of a run."""
    d = config.data
    return {"vocab_size": d.vocab_size, "cache_root": Path(d.cache_dir).expanduser(), "val_fraction": d.val_fraction,
            "split_seed": d.resolved_split_seed(config.seed), "max_documents": d.max_documents}


def is_run_dir(path: Path) -> bool:
    """A poetlm run directory (data.json too: a run that has not written its first checkpoint yet)."""
    return (path / "config.json").is_file() and (ckpt.checkpoint_dir(path).is_dir() or (path / "data.json").is_file())


def final_model_dir(run_dir: Path, use: str) -> Path | None:
    """run_dir/final/, the trained model of a finished run, announced as what `use` takes; None if there is none."""
    final = run_dir / "final"
    if not final.is_dir():
        return None
    print(f"poetlm: note: {use} {final}, the trained model of run {run_dir}", file=sys.stderr)
    return final


def load_run_model(run_dir: Path, device="cpu") -> tuple[nn.Module, object, TrainConfig]:
    """The model of the newest checkpoint of a run (POET layers included) and its tokenizer; the model in
    final/ if the checkpoints are gone."""
    config = load_config(run_dir / "config.json")
    if not ckpt.list_checkpoints(run_dir) and (final := final_model_dir(run_dir, "no checkpoint left: loading")):
        return *load_model_dir(final, device), config
    tokenizer = load_tokenizer(run_dir / "tokenizer", hint=RUN_TOKENIZER)
    model = prepare_model(load_model(config, len(tokenizer)), config)
    state = ckpt.load_checkpoint(run_dir, map_location=device)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, config


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
    if is_run_dir(path):
        return load_run_model(path, device)
    if not (path / "config.json").is_file():
        raise DataError(f"{path} is neither a poetlm run directory (config.json + data.json) nor a model directory (config.json + weights)")
    return *load_model_dir(path, device), None
