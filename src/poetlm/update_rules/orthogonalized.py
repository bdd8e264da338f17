"""Muon on so(b): momentum of the skew gradient, orthogonalized so every rotation plane turns equally."""

from __future__ import annotations

import torch

from ..orthogonal import orthogonalize_skew


class Orthogonalized:
    """D = orth(m) (or orth(g + β·m) with Nesterov), m ← β·m + g, kept across folds.

    orth gives D the eigenplanes of the momentum with all singular values 1 (Newton–Schulz: ≈ 1, within
    0.7–1.2), so a step Q = −lr·c·D turns each plane by ≈ lr radians: direction from the gradient history,
    magnitude from the schedule alone.
    """

    def __init__(self, config) -> None:
        self.config = config

    def direction(self, grad: torch.Tensor, state: dict, active: bool = True) -> torch.Tensor | None:
        cfg = self.config
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        momentum = state["momentum"].mul_(cfg.beta1).add_(grad)
        if not active:
            return None
        ahead = grad.add(momentum, alpha=cfg.beta1) if cfg.nesterov else momentum
        return orthogonalize_skew(ahead, cfg.orthogonalize)

    def after_redraw(self, state: dict, transport) -> None:
        if self.config.transport and "momentum" in state:
            state["momentum"] = transport(state["momentum"])
        else:
            state.clear()
