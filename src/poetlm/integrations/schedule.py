"""POET merges in training loops written elsewhere: plain PyTorch, accelerate, Lightning, ...

Beyond forward, backward and the optimizer step, POET's layer form needs three things from a loop: a
merge every `merge_every` optimizer steps, the rotations' optimizer state reset at each merge (their
coordinates are redrawn), and a tighter gradient clip for a few steps after it (0.1× the usual clip,
ramped back linearly; paper §5). `MergeSchedule` keeps the step counter these depend on and is
checkpointed with the loop (state_dict / load_state_dict, e.g. accelerate's register_for_checkpointing).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from ..config import is_integer, is_number
from ..model import merge, poet_layers
from ..update_rules import MergeRule


def post_merge_clip(max_norm: float, steps_since_merge: int | None, ramp_steps: int) -> float:
    """The clip threshold `steps_since_merge` optimizer steps after a merge (None: none yet)."""
    if steps_since_merge is None or steps_since_merge >= ramp_steps:
        return max_norm
    return max_norm * (0.1 + 0.9 * steps_since_merge / ramp_steps)


def check_schedule(merge_every: int | None, ramp_steps: int) -> None:
    """Refuse a merge period or clip ramp that would fail (or train wrongly) only once training has started."""
    if merge_every is not None and not (is_integer(merge_every) and merge_every >= 1):
        raise ValueError(f"merge_every={merge_every!r} is invalid: must be an integer >= 1 (optimizer steps), or None "
                         "for the POET layers' POETConfig.merge_every")
    if not (is_integer(ramp_steps) and ramp_steps >= 0):
        raise ValueError(f"ramp_steps={ramp_steps!r} is invalid: must be an integer >= 0 (0 turns the post-merge clip off)")


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (and so Trainer's) wrapper: the one whose state a merge resets."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def merge_every_of(model: nn.Module) -> int:
    """POETConfig.merge_every of the model's POET layers."""
    every = {layer.config.merge_every for _, layer in poet_layers(model)}
    if not every:
        raise ValueError("the model has no POET layers: poetize it first (poetlm.poetize or poetlm.get_poet_model); "
                         "the fold-every-step optimizer poetlm.optim.POET needs no merge schedule")
    if len(every) > 1:
        raise ValueError(f"the POET layers have different merge_every {sorted(every)}: pass merge_every explicitly")
    return every.pop()


class MergeSchedule:
    """Merge-then-reinitialize for a hand-written loop. Per optimizer step:

        clip_grad_norm_(model.parameters(), schedule.clip_value())
        optimizer.step(); optimizer.zero_grad()
        schedule.step()          # merges (and resets the rotations' optimizer state) every merge_every steps

    `model` may be wrapped (DDP, accelerate); `optimizer` may be accelerate's wrapper. merge_every
    defaults to the POET layers' POETConfig.merge_every; `rule` to the paper's state reset; `gather` makes
    a sharded (FSDP2) layer whole for its merge (see `poetlm.merge`). max_grad_norm 0 or None means no clipping,
    as in Trainer: clip_value() is then inf, which clip_grad_norm_ leaves alone.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, merge_every: int | None = None,
                 max_grad_norm: float = 1.0, ramp_steps: int = 10, rule: MergeRule | None = None,
                 gather: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> None:
        check_schedule(merge_every, ramp_steps)
        if max_grad_norm is not None and not (is_number(max_grad_norm) and max_grad_norm >= 0 and not math.isnan(max_grad_norm)):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} is invalid: must be a number > 0, or 0 / None for no clipping")
        self.merge_every = merge_every if merge_every is not None else merge_every_of(model)
        self.model, self.optimizer, self.rule, self.gather = model, optimizer, rule, gather
        self.max_grad_norm = max_grad_norm or math.inf
        self.ramp_steps = ramp_steps
        self.step_count = 0
        self.last_merge_step: int | None = None

    def clip_value(self) -> float:
        """The gradient clip for the coming optimizer step (inf without clipping)."""
        since = None if self.last_merge_step is None else self.step_count - self.last_merge_step
        return post_merge_clip(self.max_grad_norm, since, self.ramp_steps)

    def step(self) -> bool:
        """Count one optimizer step; merge if one is due. Returns whether it merged.

        Called after every micro-batch of an accelerate loop, it counts only the steps accelerate's optimizer
        really took: a merge between micro-batches would leave the gradients of the old coordinates pending.
        """
        if not self._stepped():
            return False
        self.step_count += 1
        if self.step_count % self.merge_every:
            return False
        merge(self.model, None if self.optimizer is None else torch_optimizer(self.optimizer), self.rule, gather=self.gather)
        self.last_merge_step = self.step_count
        return True

    def _stepped(self) -> bool:
        """Whether the optimizer's last step() was a real one (accelerate's wrapper skips it while it accumulates
        gradients, and on an fp16 overflow)."""
        gradients = getattr(self.optimizer, "gradient_state", None)
        if gradients is not None and not gradients.sync_gradients:
            return False
        return not getattr(self.optimizer, "step_was_skipped", False)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "last_merge_step": self.last_merge_step, "merge_every": self.merge_every}

    def load_state_dict(self, state: dict) -> None:
        if state.get("merge_every") != self.merge_every:
            raise ValueError(f"the checkpoint merged every {state.get('merge_every')} steps, this schedule every "
                             f"{self.merge_every}: resume with the same merge_every")
        self.step_count = int(state["step_count"])
        self.last_merge_step = None if state["last_merge_step"] is None else int(state["last_merge_step"])
