"""What the paper watches during POET training, per layer and aggregated over a model.

- orth_err: ‖RRᵀ − I‖_F / ‖I‖_F of the current rotations (max of the input and output side);
  nonzero only through the truncated Neumann series.
- q_norm: the largest ‖Q‖_F over the blocks, an upper bound of ‖Q‖₂ (the series needs ‖Q‖₂ < 1).
- probe_cos: vᵀ·R_total·v for a fixed unit v, R_total the product of every rotation since the start.
- spectrum_drift: max_i |σ_i(W_eff) − σ_i(W0 at start)| / σ_max(W0 at start).
- svd_entropy: −(1/log n) Σ p_i log p_i with p_i = σ_i² / Σ σ_j² of W_eff (paper §7): 1 for a flat
  spectrum, lower as energy concentrates in few directions. POET keeps σ fixed, so it stays at W0's.

The last two need the singular values of every weight and are computed with `spectrum=True` only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from .layer import POETLinear
from .model import poet_layers
from .orthogonal import singular_values
from .primitives import RotationSide


def _orthogonality_error(side: RotationSide, blocks: torch.Tensor) -> float:
    if side.n_blocks == 0:
        return 0.0
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    # Padding rows of a smaller last block are exactly identity, so they add nothing to the error.
    squared = ((blocks @ blocks.transpose(-1, -2) - eye) ** 2).sum()
    return math.sqrt(float(squared) / side.dim)


def svd_entropy(weight: torch.Tensor) -> float:
    return _entropy(singular_values(weight))


def _entropy(sigma: torch.Tensor) -> float:
    p = sigma**2 / (sigma**2).sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(sigma)))


@torch.no_grad()
def layer_diagnostics(layer: POETLinear, spectrum: bool = False) -> dict[str, float]:
    layer.require_whole("layer_diagnostics")
    with layer.full_precision():  # under autocast, RRᵀ − I would read bf16 rounding as a rotation error
        return _layer_diagnostics(layer, spectrum)


def _layer_diagnostics(layer: POETLinear, spectrum: bool) -> dict[str, float]:
    blocks_in, blocks_out = layer.rotation_blocks()
    q_norms = [side.skew_blocks().flatten(1).norm(dim=1) for side in (layer.rotation_in, layer.rotation_out)]
    q_norms = torch.cat(q_norms)
    rotated_probe = layer.rotation_in.rotate(layer.probe_rotated, blocks_in.to(layer.probe_rotated.dtype))
    result = {
        "orth_err": max(_orthogonality_error(layer.rotation_in, blocks_in), _orthogonality_error(layer.rotation_out, blocks_out)),
        "q_norm": float(q_norms.max()) if len(q_norms) else 0.0,
        "probe_cos": float(layer.probe @ rotated_probe),
    }
    if spectrum:
        layer.record_initial_spectrum()
        sigma = singular_values(layer.effective_weight((blocks_in, blocks_out)))
        initial = layer.initial_spectrum.float().cpu()
        result["spectrum_drift"] = float((sigma - initial).abs().max() / initial.max())
        result["svd_entropy"] = _entropy(sigma)
    return result


def model_diagnostics(model: nn.Module, spectrum: bool = False,
                      gather: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
    """Mean of each per-layer diagnostic over the POET layers (orth_err, q_norm and spectrum_drift also as
    their max). Sharded models: `gather` as for `poetlm.merge`, one layer at a time."""
    per_layer = []
    for _, layer in poet_layers(model):
        with (gather or contextlib.nullcontext)(layer):
            per_layer.append(layer_diagnostics(layer, spectrum))
    if not per_layer:
        return {}
    result = {key: sum(d[key] for d in per_layer) / len(per_layer) for key in per_layer[0]}
    for key in ("orth_err", "q_norm", "spectrum_drift"):
        if key in per_layer[0]:
            result[f"{key}_max"] = max(d[key] for d in per_layer)
    return result
