"""transformers.Trainer integration: merges on schedule and POET's optimizer groups.

    optimizer = trainer_optimizer(model, args, lr_poet=2e-3)
    trainer = Trainer(model=model, args=args, train_dataset=..., optimizers=(optimizer, None),
                      callbacks=[POETCallback()])

Everything the callback does follows from `state.global_step`, so a run resumed from a Trainer
checkpoint merges and clips exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..model import merge, param_groups
from ..update_rules import MergeRule
from .schedule import check_schedule, merge_every_of, post_merge_clip, torch_optimizer


def trainer_optimizer(model: nn.Module, args: TrainingArguments, lr_poet: float) -> torch.optim.Optimizer:
    """The optimizer for Trainer(optimizers=(optimizer, None)): the class and hyper-parameters args.optim
    selects, over POET's groups — rotations at `lr_poet` without weight decay, other matrices at
    args.learning_rate with args.weight_decay, vectors without decay. Trainer's scheduler scales every
    group alike, and Trainer logs the first group's learning rate, so the base groups come first."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = param_groups(model, lr_base=args.learning_rate, lr_poet=lr_poet, weight_decay=args.weight_decay)
    groups.sort(key=lambda group: group["name"] == "poet")
    return optimizer_cls(groups, **kwargs)


class POETCallback(TrainerCallback):
    """Merges the POET layers every `merge_every` optimizer steps (default: their POETConfig.merge_every),
    resets the rotations' optimizer state in Trainer's optimizer (`rule`, default: the paper's reset),
    and clips gradients at 0.1× args.max_grad_norm right after a merge, ramped back over `ramp_steps`.

    The clip goes on top of Trainer's own at args.max_grad_norm: clipping again at a lower threshold is
    the same as clipping once at it. Gradient accumulation: one merge per optimizer step, as Trainer
    counts them. Under FSDP or DeepSpeed, where gradients are sharded, use ramp_steps=0; under FSDP2 pass
    `gather` too (see `poetlm.merge`).
    """

    def __init__(self, merge_every: int | None = None, ramp_steps: int = 10, rule: MergeRule | None = None,
                 gather: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> None:
        check_schedule(merge_every, ramp_steps)
        self.merge_every, self.ramp_steps, self.rule, self.gather = merge_every, ramp_steps, rule, gather

    def _every(self, model: nn.Module) -> int:
        return self.merge_every if self.merge_every is not None else merge_every_of(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not args.max_grad_norm:  # Trainer does not clip: nothing to tighten
            return
        every = self._every(model)
        last_merge = state.global_step // every * every
        clip = post_merge_clip(args.max_grad_norm, state.global_step - last_merge if last_merge else None, self.ramp_steps)
        if clip < args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self._every(model) == 0:
            merge(model, torch_optimizer(optimizer), self.rule, gather=self.gather)
