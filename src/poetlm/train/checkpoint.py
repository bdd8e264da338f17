"""Checkpoints: atomic durable writes, a checksum each, the last N intact ones kept, and everything exact resume needs.

A checkpoint holds the model (POET's state included: W0, coordinates, merge counts), every optimizer
and scheduler, the loop's counters and all RNG states. Data batches are a pure function of the step,
so the step is the data position.

Checkpoints hold only tensors and plain data (RNG states included) and are loaded with
`torch.load(weights_only=True)`: a file planted in a run directory cannot run code. Next to each
`step_N.pt` a `step_N.pt.sha256` (`sha256sum -c` format) records its checksum, so a damaged file is
recognised instead of loading as garbage weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from . import files

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt$")
CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_run_dir(path: Path) -> bool:
    """A poetlm run directory (data.json too: a run that has not written its first checkpoint yet)."""
    return (path / "config.json").is_file() and (checkpoint_dir(path).is_dir() or (path / "data.json").is_file())


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in checkpoint_dir(run_dir).glob("step_*.pt") if CHECKPOINT_PATTERN.search(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.search(path.name).group(1))


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers (numpy's own state holds an ndarray, which weights_only refuses)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _HashingWriter:
    """Passes torch.save's bytes to a file while hashing them, so the checkpoint is not read back to hash it."""

    def __init__(self, file, digest) -> None:
        self.file, self.digest = file, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write step_XXXXXXXX.pt and its checksum durably, then drop all but the newest `keep` intact ones and
    stale temp files.

    Older checkpoints are deleted only once the new one is on disk (file and directory fsynced), so a
    crash at any point leaves at least one complete checkpoint.
    """
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    with files.atomic_writer(path) as f:
        digest = hashlib.sha256()
        torch.save({**payload, "step": step, "rng": rng_state()}, _HashingWriter(f, digest))
        # The checksum lands before the checkpoint: a step_N.pt never exists without its own checksum file.
        files.write_text(checksum_path(path), f"{digest.hexdigest()}  {path.name}\n")
    _rotate(run_dir, path, keep)
    files.remove_temporaries(directory)
    return path


def _rotate(run_dir: Path, written: Path, keep: int) -> None:
    """Keep `written` and the newest intact checkpoints, `keep` in all, and delete the others: a damaged one
    (resume already skips it) must not take the place of an intact one. Older ones are verified only while
    fewer than `keep` are kept, so an intact run reads one checkpoint back per save (keep=2)."""
    kept = 1
    for path in reversed(list_checkpoints(run_dir)):
        if path == written:
            continue
        if kept < keep and _intact(path):
            kept += 1
            continue
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)


def _intact(path: Path) -> bool:
    try:
        _verify(path)
    except CheckpointError as error:
        print(f"poetlm: warning: {error}; deleting it", file=sys.stderr)
        return False
    return True


def _verify(path: Path) -> None:
    try:
        expected = checksum_path(path).read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} has no readable checksum file {checksum_path(path).name} "
                              "(not written by this poetlm version, or its write was cut short)") from None
    if files.sha256_file(path) != expected:
        raise CheckpointError(f"{path.name} does not match its checksum: the file is damaged")


def _reason(error: Exception) -> str:
    """One line of a load error: torch's unpickling errors span paragraphs, an empty file's EOFError says nothing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    if isinstance(error, EOFError) and not detail:
        detail = "the file ends before its data"
    return f"{type(error).__name__}: {detail}"


class NewestDamaged(CheckpointError):
    """The newest checkpoint is damaged, and the caller asked for no older one (`load_checkpoint(older=False)`)."""


def load_checkpoint(run_dir: Path, map_location="cpu", older: bool = True) -> dict:
    """The newest intact checkpoint of a run; a damaged newer one is reported and the previous one used (without
    `older`: NewestDamaged instead, for a caller that has a better fallback)."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}: the run stopped before its first one; start it again")
    problems = []
    for path in reversed(candidates):
        try:
            _verify(path)
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # damaged, truncated, or no checksum: try the one before it
            # weights_only names the class or function it refused by its pickle opcode, GLOBAL: a planted file.
            blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
            if isinstance(error, pickle.UnpicklingError) and blocked:
                raise CheckpointError(
                    f"{path} holds Python objects other than tensors and plain data ({blocked[0]}); poetlm refuses to "
                    "unpickle it because that can run arbitrary code, and its own checkpoints hold nothing else. Remove "
                    "the file unless you know where it came from") from None
            # Any other failure to read it (random bytes that match a rewritten checksum, an empty file) is damage.
            problems.append(str(error) if isinstance(error, CheckpointError) else
                            f"{path.name} is damaged or unreadable ({_reason(error)})")
            if not older:
                raise NewestDamaged(problems[0]) from None
            continue
        if problems:
            print(f"poetlm: warning: {'; '.join(problems)}; using the older checkpoint {path.name} (step {state['step']})",
                  file=sys.stderr)
        state["path"] = path
        return state
    raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: {'; '.join(problems)}. "
                          "Restore the files from a copy, or start the run again")


@contextlib.contextmanager
def restoring(path: Path):
    """Around loading a checkpoint's states into what the run builds: a state that does not fit (another
    method's optimizers, a model of other sizes) is one CheckpointError naming the checkpoint."""
    try:
        yield
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
        detail = " ".join(str(error).split())  # torch's size mismatches span lines
        detail = detail if len(detail) <= 300 else detail[:300] + " …"
        raise CheckpointError(f"{path} does not fit the model and optimizers this run builds ({type(error).__name__}: "
                              f"{detail}): it was written by another run, method or model. Remove it to resume from an "
                              "older checkpoint, or start a new run") from None
