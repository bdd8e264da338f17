"""The reparameterized (layer) form: what a merge does to the rotation parameters' optimizer state.

After a merge the skew parameters are zero again and act on freshly drawn coordinates, so any state an
optimizer kept for them describes coordinates that no longer exist. The paper resets it.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch


class MergeRule(Protocol):
    def after_merge(self, optimizer: torch.optim.Optimizer, rotation_params: Iterable[torch.nn.Parameter]) -> None: ...


def state_owners(optimizer) -> list:
    """The optimizers under `optimizer` that keep per-parameter state: itself, or the ones it chains
    (`poetlm.optim.Chained`, whose `state` is a merged copy) or wraps (accelerate's and Trainer's wrapper:
    `.optimizer`; torch's ZeroRedundancyOptimizer: `.optim`)."""
    children = getattr(optimizer, "optimizers", None)
    if isinstance(children, (list, tuple)):
        return [owner for child in children for owner in state_owners(child)]
    for attribute in ("optimizer", "optim"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return state_owners(inner)
    return [optimizer]


class ResetState:
    """The paper's rule: forget every moment and step count of the rotation parameters.

    Works with any torch.optim optimizer, chained or wrapped (`state_owners`): their per-parameter state
    lives in `state[p]`, and an absent entry is lazily re-created (step 0, zero moments) at the next step.
    """

    def after_merge(self, optimizer, rotation_params) -> None:
        rotation_params = list(rotation_params)
        for owner in state_owners(optimizer):
            for param in rotation_params:
                owner.state.pop(param, None)


class KeepState:
    """Carry the optimizer state across merges unchanged (an ablation of the paper's reset)."""

    def after_merge(self, optimizer, rotation_params) -> None:
        pass
