"""Checkpoints: atomic writes, the last N kept, and everything exact resume needs.

A checkpoint holds the model (POET buffers included: W0, coordinates, merge counts), every optimizer
and scheduler, the loop's counters and all RNG states. Data batches are a pure function of the step,
so the step is the data position.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in checkpoint_dir(run_dir).glob("step_*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write step_XXXXXXXX.pt via a temporary file and rename, then drop all but the newest `keep`."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({**payload, "step": step, "rng": rng_state()}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path, map_location="cpu") -> dict:
    """The newest readable checkpoint of a run (a corrupt newest one falls back to the previous)."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}: the run stopped before its first one; start it again")
    errors = []
    for path in reversed(candidates):
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            state["path"] = path
            return state
        except Exception as error:  # a truncated or corrupt file: try the one before it
            errors.append(f"{path.name}: {error}")
    raise CheckpointError(f"every checkpoint in {checkpoint_dir(run_dir)} is unreadable: {'; '.join(errors)}")
