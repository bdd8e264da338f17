"""Metrics: one JSON object per line in run_dir/metrics.jsonl, mirrored to TensorBoard when installed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


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
        """Drop lines logged after the checkpoint we resume from: they will be logged again."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by the interruption
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.values.setdefault(key, []).append(float(value))
        if not self.enabled:
            return
        with self.path.open("a") as f:
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
