"""Metrics: one JSON object per line in run_dir/metrics.jsonl, always; TensorBoard (on by default) and
Weights & Biases as the run's [logging] section says. A backend that is on but cannot run is a warning
on stderr (once per process), never a silent gap: metrics.jsonl still has everything.
"""

from __future__ import annotations

import json
import math
import secrets
import statistics
import sys
from pathlib import Path

from . import files
from .config import TrainConfig

_warned: set[str] = set()


def standard_json(value, **kwargs) -> str:
    """json.dumps with every non-finite float as null: Python's bare Infinity and NaN are not JSON, and jq,
    JavaScript or a strict parser reject the whole file (a diverged run's perplexity overflows to inf)."""
    def finite(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(entry) for entry in item]
        return item
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def format_ppl(value: float, digits: int = 2) -> str:
    """A perplexity as text: fixed-point, but a diverged run's (from 1e6) in e-notation rather than hundreds
    of digits, and an overflowed one as inf."""
    return f"{value:.{digits}e}" if value >= 1e6 else f"{value:.{digits}f}"


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"poetlm: warning: {message}", file=sys.stderr)


def _tensorboard(run_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn_once("tensorboard", "logging.tensorboard is on but TensorBoard is not installed, so this run writes no "
                  "TensorBoard logs (metrics.jsonl has every metric). Install it with `pip install tensorboard` "
                  "(a poetlm dependency: reinstalling poetlm brings it), or set logging.tensorboard=false")
        return None
    # A resumed run logs the steps after its checkpoint again: purge_step hides the first attempt's.
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)


def _wandb(run_dir: Path, config: TrainConfig):
    try:
        import wandb
    except ImportError:
        warn_once("wandb", "logging.wandb is on but wandb is not installed, so this run logs nothing to Weights & Biases "
                  "(metrics.jsonl has every metric). Install it with `pip install 'poetlm[wandb]'`, or set logging.wandb=false")
        return None
    id_file = run_dir / "wandb_run_id"  # a resumed run continues its own W&B run
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    try:
        run = wandb.init(project=config.logging.wandb_project, name=config.run_name, id=run_id, resume="allow",
                         dir=str(run_dir), config=config.to_dict(), mode=config.logging.wandb_mode)
    except wandb.errors.Error as error:
        warn_once("wandb", f"could not start a Weights & Biases run ({error}), so this run logs nothing to W&B "
                  "(metrics.jsonl has every metric). Without a network, set logging.wandb_mode='offline'")
        return None
    files.write_text(id_file, run_id + "\n")
    # Records carry their own step, and a resumed run logs steps after its checkpoint again: plot
    # against that step rather than W&B's own counter, which only goes up.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class MetricsLogger:
    """config=None: metrics.jsonl only; otherwise also the backends of config.logging."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None, config: TrainConfig | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.values: dict[str, list[float]] = {}
        self._writer = self._wandb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if config is not None and config.logging.tensorboard:
            self._writer = _tensorboard(Path(run_dir), resume_step)
        if config is not None and config.logging.wandb:
            self._wandb = _wandb(Path(run_dir), config)

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
                self._remember(record)  # the run's summary (median speed, peak memory) covers its earlier sessions too
        files.write_text(self.path, "".join(k + "\n" for k in kept))
        if unreadable:
            shown = ", ".join(map(str, unreadable[:10])) + (" …" if len(unreadable) > 10 else "")
            print(f"poetlm: warning: dropped {len(unreadable)} unreadable line(s) of {self.path} (line {shown})", file=sys.stderr)

    def _remember(self, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.values.setdefault(key, []).append(float(value))

    def log(self, record: dict) -> None:
        self._remember(record)
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(standard_json(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log({key: value for key, value in record.items() if isinstance(value, (int, float))})

    def median(self, key: str) -> float | None:
        values = self.values.get(key)
        return statistics.median(values) if values else None

    def maximum(self, key: str) -> float | None:
        values = self.values.get(key)
        return max(values) if values else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
