"""Orthogonal maps from skew-symmetric matrices, batched over blocks, and skew orthogonalization.

Every rotation block in poetlm is produced by `orthogonal_map`; forward passes, merges, per-step folds,
export and diagnostics all go through it, on every device, so there is exactly one Neumann polynomial.
"""

from __future__ import annotations

import functools

import torch

from .config import ORTHOGONALIZERS, PARAMETERIZATIONS


@functools.lru_cache(maxsize=None)
def _cached_upper_indices(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(size, size, offset=1, device=device)
    return rows, cols


def _upper_indices(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():  # a compiled graph holds them as constants; dynamo warns on lru_cache
        rows, cols = torch.triu_indices(size, size, offset=1, device=device)
        return rows, cols
    return _cached_upper_indices(size, device)


def skew_from_packed(packed: torch.Tensor, block_sizes: list[int], b: int) -> torch.Tensor:
    """Packed strict-upper-triangle parameters -> (n_blocks, b, b) skew matrices Q = U − Uᵀ.

    Parameters are the strict upper triangles of the blocks, concatenated block after block. All blocks
    have size b except possibly the last (the remainder of a dimension that b does not divide); it sits
    in the top-left corner of its b×b slot, and the padding rows/columns of Q stay zero, so its rotation
    is the identity there and all blocks can still be mapped in one batched call.
    """
    full = sum(1 for size in block_sizes if size == b)
    per_block = b * (b - 1) // 2
    upper = packed.new_zeros(len(block_sizes), b, b)
    rows, cols = _upper_indices(b, packed.device)
    upper[:full, rows, cols] = packed[: full * per_block].view(full, per_block)
    if full < len(block_sizes):
        rows, cols = _upper_indices(block_sizes[-1], packed.device)
        upper[full, rows, cols] = packed[full * per_block:]
    return upper - upper.transpose(-1, -2)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """CNP: (I + Q)(I + Q + … + Q^k), the Cayley transform with its inverse truncated after k terms."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    series = eye + q
    for _ in range(terms - 1):  # Horner: S ← I + Q·S turns I + Q into I + Q + … + Q^k
        series = eye + q @ series
    return series + q @ series


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform (I + Q)(I − Q)⁻¹; the two factors commute, so one linear solve suffices."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q)


def orthogonal_map(q: torch.Tensor, parameterization: str = "cayley_neumann", terms: int = 3) -> torch.Tensor:
    """Skew (..., b, b) -> (near-)orthogonal (..., b, b). Q = 0 gives I for every map."""
    if parameterization == "cayley_neumann":
        return cayley_neumann(q, terms)
    if parameterization == "cayley":
        return cayley(q)
    if parameterization == "exp":
        return torch.linalg.matrix_exp(q)
    raise ValueError(f"parameterization {parameterization!r} is not one of {PARAMETERIZATIONS}")


def generator_scale(parameterization: str) -> float:
    """c such that orthogonal_map(c·A) turns each eigenplane of a unit skew A by ≈ 1 radian per unit.

    Cayley and CNP are I + 2Q + O(Q²) near 0, exp is I + Q + O(Q²): a step of "angle θ" is Q = c·θ·A.
    """
    return 1.0 if parameterization == "exp" else 0.5


def orthogonalize_skew(a: torch.Tensor, method: str = "exact", eps: float = 1e-7) -> torch.Tensor:
    """Skew (..., b, b) -> the skew matrix with the same eigenplanes and every nonzero singular value 1.

    For a skew A, AᵀA = −A² commutes with A, so the polar factor A·(AᵀA)^(−1/2) is skew again. "exact"
    computes it by an eigendecomposition of AᵀA in fp64 (directions with a singular value below
    eps·σ_max, e.g. the kernel of an odd-sized block, stay zero); "newton_schulz" runs Muon's quintic
    iteration, an odd polynomial in A (so the result is skew too) whose singular values land in ≈[0.7, 1.2].
    """
    if method == "exact":
        wide = a.double()
        gram = wide.transpose(-1, -2) @ wide
        values, vectors = torch.linalg.eigh(gram)
        floor = eps**2 * values.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(wide.dtype).tiny)
        inv_sqrt = torch.where(values > floor, values.clamp_min(floor).rsqrt(), torch.zeros_like(values))
        polar = wide @ (vectors * inv_sqrt.unsqueeze(-2)) @ vectors.transpose(-1, -2)
        return (0.5 * (polar - polar.transpose(-1, -2))).to(a.dtype)  # skew to the last bit, not just to rounding
    if method == "newton_schulz":
        x = a / a.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]
        for _ in range(5):
            gram = x @ x.transpose(-1, -2)
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        return x
    raise ValueError(f"orthogonalization {method!r} is not one of {ORTHOGONALIZERS}")
