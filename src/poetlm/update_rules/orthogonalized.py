"""Muon on so(b): momentum of the skew gradient, orthogonalized so every rotation plane turns equally."""

from __future__ import annotations

import torch

from ..orthogonal import choose_direction, orthogonalize_skew, pack_skew, unpack_skew


class Orthogonalized:
    """D = orth(m) (or orth(g + β·m) with Nesterov), m ← β·m + g, kept across folds.

    orth gives D the eigenplanes of the momentum with all singular values 1 (Newton–Schulz: ≈ 1, within
    0.7–1.2 for every plane above ~1% of the largest, never above 1.2), so a step Q = −lr·c·D turns each
    plane by ≈ lr radians: direction from the gradient history, magnitude from the schedule alone.
    The momentum is skew, so the state keeps its upper triangles only (`pack_skew`): with whole-side blocks
    it would otherwise be as large as AdamW's two moments.
    """

    bounded = True  # ‖D‖₂ ≤ 1.2: the map of lr·D may be a truncated series (see POET)

    def __init__(self, config) -> None:
        self.config = config
        self.orthogonalize = orthogonalize_skew  # POET(compile=) swaps in a compiled one

    def direction(self, grad: torch.Tensor, state: dict, active: bool = True) -> torch.Tensor | None:
        cfg = self.config
        if "momentum" not in state:
            state["momentum"] = pack_skew(torch.zeros_like(grad))
        elif state["momentum"].dim() == 3:  # saved by a version that kept whole blocks
            state["momentum"] = pack_skew(state["momentum"])
        packed_grad = pack_skew(grad)
        packed = state["momentum"].mul_(cfg.beta1).add_(packed_grad)
        if not active:
            return None
        ahead = unpack_skew(packed_grad.add(packed, alpha=cfg.beta1) if cfg.nesterov else packed)
        method, dtype = choose_direction(cfg.orthogonalize, cfg.direction_dtype, ahead.shape[-1], ahead.device)
        if dtype == "bf16" and method == "newton_schulz":
            direction = self.orthogonalize(ahead.bfloat16(), method).to(ahead.dtype)
            return 0.5 * (direction - direction.transpose(-1, -2))  # bf16 rounding leaves it only nearly skew
        return self.orthogonalize(ahead, method)

    def isometric(self, direction: torch.Tensor) -> bool:
        """Whether `direction` (as returned) is an exact partial isometry, so the map may take its closed
        form (`isometry_increment`)."""
        cfg = self.config
        return choose_direction(cfg.orthogonalize, cfg.direction_dtype, direction.shape[-1], direction.device)[0] == "exact"

    def after_redraw(self, state: dict, transport) -> None:
        if self.config.transport and "momentum" in state:
            momentum = state["momentum"]
            state["momentum"] = pack_skew(transport(unpack_skew(momentum) if momentum.dim() == 2 else momentum))
        else:
            state.clear()
