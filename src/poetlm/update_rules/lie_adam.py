"""Adam in the Lie algebra: per-entry moments of each block's skew gradient, kept across folds."""

from __future__ import annotations

import torch


class LieAdam:
    """m and v are elementwise, so m̂/(√v̂ + ε) of a skew gradient is skew again.

    The moments describe planes of the current coordinates; a redraw restarts them (Adam's bias
    correction assumes moments that have seen every step, which transported entries have not).
    """

    def __init__(self, config) -> None:
        self.config = config

    def direction(self, grad: torch.Tensor, state: dict, active: bool = True) -> torch.Tensor | None:
        cfg = self.config
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
            state["step"] = 0
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - cfg.beta1)
        state["exp_avg_sq"].mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
        if not active:
            return None
        m_hat = state["exp_avg"] / (1 - cfg.beta1 ** state["step"])
        v_hat = state["exp_avg_sq"] / (1 - cfg.beta2 ** state["step"])
        return m_hat / (v_hat.sqrt() + cfg.eps)

    def after_redraw(self, state: dict, transport) -> None:
        state.clear()
