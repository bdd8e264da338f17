"""Durable, atomic file writes for run directories.

A file is written under a temporary name unique to this process in the same directory, fsynced, renamed
over the target and the directory fsynced: after a crash the target holds either the old or the new
content, never a mix or nothing, and two processes never write the same temporary file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
from pathlib import Path

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
_held: set[Path] = set()  # directories this process holds (by its outermost `exclusive` block)


class DirectoryInUse(RuntimeError):
    """Another process holds the run directory; the message names its PID."""


@contextlib.contextmanager
def exclusive(directory: str | Path):
    """Hold `directory` for this process while the block runs: another process asking for it meanwhile gets
    DirectoryInUse (two processes training one run would interleave its checkpoints and metrics). An advisory
    flock on directory/.lock, which the kernel drops when the process ends however it ends, so a killed run
    leaves nothing to clean up. Nested blocks in one process hold it once."""
    directory = Path(directory).resolve()
    if directory in _held:
        yield
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryInUse(f"{directory} is in use by another poetlm process (PID {holder}), which is training it: "
                                 "wait for it to end, or stop it, then resume") from None
        pid = str(os.getpid()).encode()
        if os.pread(fd, 32, 0) != pid:  # rewritten only for a new holder: holding it again changes no file
            os.ftruncate(fd, 0)
            os.pwrite(fd, pid, 0)
        _held.add(directory)
        try:
            yield
        finally:
            _held.discard(directory)
    finally:
        os.close(fd)  # releases the lock


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def remove_temporaries(directory: Path) -> None:
    """Remove what processes killed while writing left in `directory` under temporary names (files, or a
    directory such as final/'s). Only one run writes in a run directory, so none of them is still in use."""
    for stale in Path(directory).glob(f"*{TEMP_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and token caches can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb"):
    """A file object whose content replaces `path` durably when the block ends; an error leaves `path` as it was."""
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies, as for open()
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)
