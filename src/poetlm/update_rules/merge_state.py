"""The reparameterized (layer) form: what a merge does to the rotation parameters' optimizer state.

After a merge the skew parameters are zero again and act on freshly drawn coordinates, so any state an
optimizer kept for them describes coordinates that no longer exist. The paper resets it.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch


class MergeRule(Protocol):
    def after_merge(self, optimizer: torch.optim.Optimizer, rotation_params: Iterable[torch.nn.Parameter]) -> None: ...


class ResetState:
    """The paper's rule: forget every moment and step count of the rotation parameters.

    Works with any torch.optim optimizer: their per-parameter state lives in `optimizer.state[p]`, and
    an absent entry is lazily re-created (step 0, zero moments) at the next step.
    """

    def after_merge(self, optimizer, rotation_params) -> None:
        for param in rotation_params:
            optimizer.state.pop(param, None)


class KeepState:
    """Carry the optimizer state across merges unchanged (an ablation of the paper's reset)."""

    def after_merge(self, optimizer, rotation_params) -> None:
        pass
