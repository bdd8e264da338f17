"""Metrics: one JSON object per line in run_dir/metrics.jsonl, mirrored to TensorBoard when installed."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from . import files


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.values: dict[str, list[float]] = {}
        self._writer = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self._writer = None

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from: they will be logged again.

        The file is replaced atomically, so a kill during resume leaves it whole. Lines that cannot be
        read (cut short by a kill, or damaged bytes) are dropped too, and said so.
        """
        if not self.path.exists():
            return
        kept, unreadable = [], []
        for number, raw in enumerate(self.path.read_bytes().splitlines(), 1):
            try:
                record = json.loads(raw.decode("utf-8"))
                after = record["step"] > step
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                unreadable.append(number)
                continue
            if not after:
                kept.append(raw.decode("utf-8"))
        files.write_text(self.path, "".join(k + "\n" for k in kept))
        if unreadable:
            shown = ", ".join(map(str, unreadable[:10])) + (" …" if len(unreadable) > 10 else "")
            print(f"poetlm: warning: dropped {len(unreadable)} unreadable line(s) of {self.path} (line {shown})", file=sys.stderr)

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.values.setdefault(key, []).append(float(value))
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def median(self, key: str) -> float | None:
        values = self.values.get(key)
        return statistics.median(values) if values else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
