"""POET in other people's training loops: transformers.Trainer, accelerate, plain PyTorch."""

from .schedule import MergeSchedule, post_merge_clip
from .trainer import POETCallback, trainer_optimizer

__all__ = ["MergeSchedule", "POETCallback", "post_merge_clip", "trainer_optimizer"]
