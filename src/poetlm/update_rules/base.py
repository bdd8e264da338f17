"""The interface of a rotation update rule and its configuration."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..config import DIRECTION_DTYPES, ORTHOGONALIZERS, is_integer, is_number

RULES = ("orthogonalized", "lie_adam")


@dataclass(frozen=True)
class RuleConfig:
    """How `poetlm.optim.POET` turns skew gradients into rotations (the step size is the optimizer's lr).

    name: "orthogonalized" (momentum, then every eigenplane turned by the same angle lr) or "lie_adam"
        (Adam's moments of the skew gradient; lr scales m̂/√v̂ as in Adam; its steps have no spectral bound, so
        they are folded by an exact map: the exact Cayley transform where POETConfig.parameterization is the
        truncated Cayley–Neumann series, else the configured map).
    beta1: momentum (both rules).
    beta2: Adam's second moment decay (lie_adam only).
    eps: added to Adam's √v̂ in the denominator, so that a near-zero second moment takes no huge step (lie_adam only).
    nesterov: orthogonalize g + β·m instead of m (orthogonalized only).
    alternate: rotate only the output side on even steps and only the input side on odd steps; both
        sides' momenta are updated every step (one that saw only the steps it turns trained far worse:
        docs/benchmarks.md, "The fold form's optimizer").
    redraw_every: steps between redraws of the coordinates (permutations / subsets).
    transport: at a redraw, keep the momentum of every plane whose two coordinates share a block before
        and after (False: start the momentum from zero). lie_adam always restarts its moments.
    orthogonalize: "newton_schulz" (Muon's quintic, 4 steps: matrix products only, fast on GPUs), "exact"
        (eigendecomposition; its directions let the map take one product instead of three) or "auto" (the
        faster on the device: `orthogonal.choose_direction`; with fp32 products, exact on CPUs from b = 192).
        At tiny, 1000 steps, exact and Newton–Schulz reached the same val ppl (54.0 vs 54.3).
    direction_dtype: precision of the Newton–Schulz products: "fp32" (the default), "bf16" (tensor cores;
        CPUs without bf16 units emulate it slowly) or "auto" (bf16 on CPUs with AMX from b = 128, where bf16
        products run several times faster, fp32 elsewhere: one thread at llama-60m b=256, 10–13% off a 256-token step,
        but no faster at tiny on two threads and +0.27 val ppl on four corpora, docs/benchmarks.md "Fifth
        pass"). Only the direction is computed there: it is made skew again in fp32, and the map and the
        fold stay in the weight's precision, so the spectrum is kept either way.
    """

    name: str = "orthogonalized"
    beta1: float = 0.95
    beta2: float = 0.999
    eps: float = 1e-8
    nesterov: bool = True
    alternate: bool = True
    redraw_every: int = 50
    transport: bool = True
    orthogonalize: str = "auto"
    direction_dtype: str = "fp32"

    def __post_init__(self) -> None:
        checks = [
            ("name", self.name in RULES, f"choose one of {RULES}"),
            ("beta1", is_number(self.beta1) and 0 <= self.beta1 < 1, "must be a number in [0, 1) (e.g. 0.95)"),
            ("beta2", is_number(self.beta2) and 0 <= self.beta2 < 1, "must be a number in [0, 1) (e.g. 0.999)"),
            ("eps", is_number(self.eps) and 0 < self.eps < math.inf, "must be a finite number > 0 (e.g. 1e-8)"),
            ("nesterov", isinstance(self.nesterov, bool), "must be True or False"),
            ("alternate", isinstance(self.alternate, bool), "must be True or False"),
            ("redraw_every", is_integer(self.redraw_every) and self.redraw_every >= 1, "must be an integer >= 1 (e.g. 50)"),
            ("transport", isinstance(self.transport, bool), "must be True or False"),
            ("orthogonalize", self.orthogonalize in ORTHOGONALIZERS, f"choose one of {ORTHOGONALIZERS}"),
            ("direction_dtype", self.direction_dtype in DIRECTION_DTYPES, f"choose one of {DIRECTION_DTYPES}"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"RuleConfig.{key}={getattr(self, key)!r} is invalid: {allowed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RotationRule(Protocol):
    """Data in, data out: it never sees the weight, the layer form, DDP or the trainer.

    `direction` gets one side's skew gradient blocks (n, b, b) — ∂loss/∂Q for the rotation orthogonal_map(Q)
    folded at Q = 0 — and that side's state dict (empty at the start), updates the state and, if the side
    turns this step (`active`), returns the skew direction D (else None: alternating sides skip the costly
    part); the optimizer then folds the rotation with Q = −lr·c·D. `after_redraw` is called when the side's
    coordinates are redrawn, with a function that carries (n, b, b) blocks to the new ones.
    """

    def direction(self, grad: torch.Tensor, state: dict, active: bool = True) -> torch.Tensor | None: ...

    def after_redraw(self, state: dict, transport: Callable[[torch.Tensor], torch.Tensor]) -> None: ...


def make_rule(config: RuleConfig) -> RotationRule:
    from .lie_adam import LieAdam
    from .orthogonalized import Orthogonalized

    return {"orthogonalized": Orthogonalized, "lie_adam": LieAdam}[config.name](config)
