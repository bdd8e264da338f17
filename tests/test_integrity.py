"""Run-directory integrity: safe and verified checkpoints, durable writes, metrics that survive damage."""

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from poetlm.train import checkpoint as ckpt
from poetlm.train import files
from poetlm.train.metrics import MetricsLogger


def save(run_dir, step, value=1.0, keep=5):
    return ckpt.save_checkpoint(run_dir, step, {"model": {"w": torch.full((4,), value)}}, keep)


def test_checkpoint_round_trip_restores_every_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # numpy now holds a cached gaussian, part of its state
    save(tmp_path, 7)
    expected = random.random(), np.random.standard_normal(), torch.rand(1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = ckpt.load_checkpoint(tmp_path)
    ckpt.set_rng_state(state["rng"])
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.ones(4))
    assert (random.random(), np.random.standard_normal(), torch.rand(1)) == expected


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = ckpt.checkpoint_dir(tmp_path) / "step_00000009.pt"
    path.parent.mkdir()
    torch.save({"model": _RunsCode(marker)}, path)
    # Whoever planted it can also plant a matching checksum: refusing must not depend on it.
    ckpt.checksum_path(path).write_text(f"{files.sha256_file(path)}  {path.name}\n")
    with pytest.raises(ckpt.CheckpointError, match="refuses to unpickle"):
        ckpt.load_checkpoint(tmp_path)
    assert not marker.exists()


def _garble(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(64)
    path.write_bytes(bytes(data))  # same size: only a checksum tells


def test_a_damaged_checkpoint_is_recognised_and_the_fallback_announced(tmp_path, capsys):
    save(tmp_path, 3, value=3.0)
    newest = save(tmp_path, 6, value=6.0)
    _garble(newest)
    state = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.full((4,), 3.0))
    err = capsys.readouterr().err
    assert "step_00000006.pt does not match its checksum" in err and "using the older checkpoint step_00000003.pt" in err
    _garble(ckpt.checkpoint_dir(tmp_path) / "step_00000003.pt")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep,kept", [(2, [10, 20]), (3, [5, 10, 20])])
def test_rotation_keeps_the_newest_intact_checkpoints_and_deletes_damaged_ones(tmp_path, capsys, keep, kept):
    for step in (5, 10, 14):
        save(tmp_path, step, keep=3)
    damaged = ckpt.checkpoint_dir(tmp_path) / "step_00000014.pt"
    _garble(damaged)
    assert ckpt.load_checkpoint(tmp_path)["step"] == 10  # resume falls back to it, and saves next at step 20
    save(tmp_path, 20, keep=keep)
    assert [int(p.stem.split("_")[1]) for p in ckpt.list_checkpoints(tmp_path)] == kept
    assert not ckpt.checksum_path(damaged).exists()
    assert "step_00000014.pt does not match its checksum: the file is damaged; deleting it" in capsys.readouterr().err


def test_a_checkpoint_without_its_checksum_is_not_trusted(tmp_path):
    path = save(tmp_path, 3)
    ckpt.checksum_path(path).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no readable checksum file"):
        ckpt.load_checkpoint(tmp_path)


def test_save_is_durable_before_the_previous_checkpoint_goes(tmp_path, monkeypatch):
    save(tmp_path, 1, keep=1)
    events = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    def unlink(self, missing_ok=False):
        events.append(("unlink", self.name))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    save(tmp_path, 2, keep=1)
    put = events.index(("replace", "step_00000002.pt"))
    removed = events.index(("unlink", "step_00000001.pt"))
    assert ("fsync", "file") in events[:put]  # the data is on disk before it takes the name
    assert ("fsync", "dir") in events[put:removed]  # the new name is on disk before the old checkpoint goes
    assert events.index(("replace", "step_00000002.pt.sha256")) < put  # never a checkpoint without its checksum
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002.pt"]


def test_stale_temporary_files_are_removed(tmp_path):
    directory = ckpt.checkpoint_dir(tmp_path)
    directory.mkdir()
    stale = [directory / "step_00000001.pt.tmp", directory / ".step_00000001.pt.4242.0badc0de.tmp"]
    for path in stale:
        path.write_bytes(b"cut short")
    save(tmp_path, 2)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in directory.iterdir()) == ["step_00000002.pt", "step_00000002.pt.sha256"]


def test_metrics_truncation_replaces_the_file_and_reports_unreadable_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [f'{{"step": {s}, "loss": 1.0}}'.encode() for s in range(1, 6)]
    lines[1] = b'{"step": 2, "loss": \xff}'  # a damaged byte: not UTF-8
    path.write_bytes(b"\n".join(lines) + b'\n{"step": 6, "lo')
    inode = path.stat().st_ino
    logger = MetricsLogger(tmp_path, resume_step=3)
    logger.close()
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 3, "loss": 1.0}\n'
    assert path.stat().st_ino != inode  # rewritten under a new name and renamed: a kill leaves the old file whole
    assert "dropped 2 unreadable line(s)" in capsys.readouterr().err


def test_a_diverged_runs_numbers_are_standard_json_and_it_is_told_so(tmp_path, capsys):
    """Bare Infinity/NaN (Python's json default) make jq, JavaScript and strict parsers reject the whole file."""
    import json
    import math

    from poetlm.train.loop import _warn_if_diverged

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))

    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"step": 1, "tokens": 10, "val_loss": 710.0, "val_ppl": math.inf, "drift": [1.0, math.nan]})
    logger.close()
    record = strict((tmp_path / "metrics.jsonl").read_text())
    assert record == {"step": 1, "tokens": 10, "val_loss": 710.0, "val_ppl": None, "drift": [1.0, None]}
    _warn_if_diverged(math.log(300) + 0.5, 300)  # a short run from scratch ends near ln V: no warning
    assert capsys.readouterr().err == ""
    for loss in (3e7, math.inf, math.nan):
        for train_loss in (None, 9.0):
            _warn_if_diverged(loss, 300, train_loss)
            assert "is far above ln(300) = 5.70, a uniform guess's over the vocabulary: the run diverged" in capsys.readouterr().err
    _warn_if_diverged(12.0, 300, 0.107)  # a tiny corpus learned by heart: its 8 validation tokens are not, and it did not diverge
    err = capsys.readouterr().err
    assert "while the training loss is 0.107: the model fits its training text" in err and "diverged" not in err
