"""Orthogonal maps from skew-symmetric matrices, batched over blocks, and skew orthogonalization.

Every rotation block in poetlm is produced by `orthogonal_map` = I + `rotation_increment`; forward passes,
merges, export and diagnostics go through the first, per-step folds through the second (R − I to its own
precision), on every device, so there is exactly one Neumann polynomial.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import ORTHOGONALIZERS, PARAMETERIZATIONS


def _skew_layout(block_sizes: tuple[int, ...], b: int, device: torch.device) -> torch.Tensor:
    """For every entry of (n_blocks, b, b) skew blocks, where it comes from in [0, packed, −packed]:
    0 for the diagonal and padding, 1 + i for the i-th packed parameter, 1 + P + i for its mirror."""
    count = sum(size * (size - 1) // 2 for size in block_sizes)
    layout = torch.zeros(len(block_sizes), b, b, dtype=torch.long, device=device)
    full, per_block = sum(1 for size in block_sizes if size == b), b * (b - 1) // 2
    rows, cols = torch.triu_indices(b, b, offset=1, device=device)
    positions = torch.arange(1, 1 + full * per_block, device=device).view(full, per_block)
    layout[:full, rows, cols], layout[:full, cols, rows] = positions, positions + count
    if full < len(block_sizes):  # the remainder block, in the top-left corner of its slot
        rows, cols = torch.triu_indices(block_sizes[-1], block_sizes[-1], offset=1, device=device)
        positions = torch.arange(1 + full * per_block, 1 + count, device=device)
        layout[full, rows, cols], layout[full, cols, rows] = positions, positions + count
    return layout.flatten()


def _flat_upper(b: int, device: torch.device) -> torch.Tensor:
    """Positions of a b×b block's strict upper triangle in its flattened entries, row by row."""
    rows, cols = torch.triu_indices(b, b, offset=1, device=device)
    return rows * b + cols


_caches = {fn: functools.lru_cache(maxsize=None)(fn) for fn in (_skew_layout, _flat_upper)}


def _cached(fn, *args) -> torch.Tensor:
    """`fn(*args)`, computed once per argument tuple; in a compiled graph, computed there (dynamo would
    trace the cache anyway, with a warning)."""
    return fn(*args) if torch.compiler.is_compiling() else _caches[fn](*args)


def skew_from_packed(packed: torch.Tensor, block_sizes: list[int], b: int) -> torch.Tensor:
    """Packed strict-upper-triangle parameters -> (n_blocks, b, b) skew matrices Q = U − Uᵀ.

    Parameters are the strict upper triangles of the blocks, concatenated block after block. All blocks
    have size b except possibly the last (the remainder of a dimension that b does not divide); it sits
    in the top-left corner of its b×b slot, and the padding rows/columns of Q stay zero, so its rotation
    is the identity there and all blocks can still be mapped in one batched call. One gather from
    [0, packed, −packed] lays the blocks out (instead of a zero fill, two triangle writes and a
    transposed subtraction), and its backward is one scatter.
    """
    layout = _cached(_skew_layout, tuple(block_sizes), b, packed.device)
    source = torch.cat([packed.new_zeros(1), packed, -packed])
    return source.index_select(0, layout).view(len(block_sizes), b, b)


def pack_skew(blocks: torch.Tensor) -> torch.Tensor:
    """(n, b, b) skew blocks -> (n, b(b−1)/2), their strict upper triangles: half the memory, no loss."""
    b = blocks.shape[-1]
    return blocks.reshape(-1, b * b).index_select(1, _cached(_flat_upper, b, blocks.device))


def unpack_skew(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_skew` (b follows from the width b(b−1)/2)."""
    b = (1 + math.isqrt(1 + 8 * packed.shape[-1])) // 2
    return skew_from_packed(packed.reshape(-1), [b] * len(packed), b)


def _eye(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)


def cayley_neumann_increment(q: torch.Tensor, terms: int) -> torch.Tensor:
    """CNP − I = 2(Q + Q² + … + Q^k) + Q^(k+1), computed without ever forming I + (something small)."""
    two = 2 * _eye(q)
    if terms in (3, 4):  # split at Q² or Q³ (Paterson–Stockmeyer): one product fewer than Horner
        shape, q = q.shape, q.reshape(-1, *q.shape[-2:])  # baddbmm fuses the sums into the products
        q2 = q @ q
        tail = torch.add(q2, q, alpha=2).add_(two)  # 2I + 2Q + Q²
        if terms == 3:  # 2Q + Q²·tail
            return torch.baddbmm(q, q2, tail, beta=2).view(shape)
        return torch.baddbmm(q + q2, q @ q2, tail, beta=2).view(shape)  # 2Q + 2Q² + Q³·tail
    inner = two + q
    for _ in range(terms - 1):  # Horner: 2I + Q(2I + … Q(2I + Q)) = 2I + 2Q + … + 2Q^(k−1) + Q^k
        inner = two + q @ inner
    return q @ inner


def cayley_increment(q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I − Q)⁻¹ − I = 2(I − Q)⁻¹Q: one linear solve."""
    return 2 * torch.linalg.solve(_eye(q) - q, q)


def rotation_increment(q: torch.Tensor, parameterization: str = "cayley_neumann", terms: int = 3) -> torch.Tensor:
    """orthogonal_map(Q) − I, to the precision of its own (small) magnitude.

    Folding a small rotation as X + (R − I)·X rounds only the product's contribution, so its orthogonality
    error in a float32 fold is ~eps·‖R − I‖ per step instead of ~eps (what forming R = I + … in float32
    and multiplying would cost), and no float64 matrix products are needed to keep spectra exact.
    """
    if parameterization == "cayley_neumann":
        return cayley_neumann_increment(q, terms)
    if parameterization == "cayley":
        return cayley_increment(q)
    if parameterization == "exp":
        return exp_increment(q)
    raise ValueError(f"parameterization {parameterization!r} is not one of {PARAMETERIZATIONS}")


EXP_TERMS = 14  # Taylor terms of exp(X) − I at ‖X‖₁ ≤ ¼: the first left out is below 1e-19·‖X‖


def exp_increment(q: torch.Tensor) -> torch.Tensor:
    """exp(Q) − I in float64, never forming I + (something small), whose rounding (matrix_exp's, ~1e-12 at
    ‖Q‖ = 0.02) a float64 weight would take in at every fold: the Taylor series of Q/2ˢ, brought back by
    s squarings of the increment, (I + E)² − I = 2E + E²."""
    wide = q.double()
    norm = float(torch.linalg.matrix_norm(wide, ord=1).max()) if wide.numel() else 0.0
    squarings = max(0, math.ceil(math.log2(norm / 0.25))) if norm > 0.25 else 0
    x = wide / 2**squarings
    term = total = x
    for k in range(2, EXP_TERMS + 1):
        term = term @ x / k
        total = total + term
    for _ in range(squarings):
        total = 2 * total + total @ total
    return total.to(q.dtype)


def isometry_increment(d: torch.Tensor, scale: float, parameterization: str = "cayley_neumann",
                       terms: int = 3) -> torch.Tensor:
    """orthogonal_map(scale·D) − I for a skew partial isometry D (D³ = −D: every singular value 0 or 1, as
    `orthogonalize_skew(…, "exact")` returns), as α·D + β·D²: one product instead of the map's three.

    Every map is a power series (or rational function) of Q whose powers of D cycle through ±D and ±D², so
    the map of D is fixed by two scalars, and these are the map's own on the 2×2 plane generator J (J² = −I,
    the same cycle): map(scale·J) − I = α·J − β·I. Same map, same truncation, to rounding; where D is only
    nearly a partial isometry (Newton–Schulz) this would not hold, so it is for exact directions only.
    """
    plane = rotation_increment(torch.tensor([[0.0, scale], [-scale, 0.0]], dtype=torch.float64),
                               parameterization, terms)
    alpha, beta = float(plane[0, 1]), -float(plane[0, 0])
    flat = d.reshape(-1, *d.shape[-2:])
    return torch.baddbmm(flat, flat, flat, beta=alpha, alpha=beta).view(d.shape)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """CNP: (I + Q)(I + Q + … + Q^k), the Cayley transform with its inverse truncated after k terms."""
    return _eye(q) + cayley_neumann_increment(q, terms)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform (I + Q)(I − Q)⁻¹; the two factors commute, so one linear solve suffices."""
    return _eye(q) + cayley_increment(q)


def orthogonal_map(q: torch.Tensor, parameterization: str = "cayley_neumann", terms: int = 3) -> torch.Tensor:
    """Skew (..., b, b) -> (near-)orthogonal (..., b, b). Q = 0 gives I for every map."""
    if parameterization == "exp":
        return torch.linalg.matrix_exp(q)
    return _eye(q) + rotation_increment(q, parameterization, terms)


def generator_scale(parameterization: str) -> float:
    """c such that orthogonal_map(c·A) turns each eigenplane of a unit skew A by ≈ 1 radian per unit.

    Cayley and CNP are I + 2Q + O(Q²) near 0, exp is I + Q + O(Q²): a step of "angle θ" is Q = c·θ·A.
    """
    return 1.0 if parameterization == "exp" else 0.5


EXACT_ON_CPU_FROM = 192  # block size from which "auto" orthogonalizes exactly on a CPU (docs/benchmarks.md)
BF16_ON_CPU_FROM = 128  # block size from which "auto" takes bf16 products where they are fast (below: a small gain at best)


def fast_bf16_products(device: torch.device) -> bool:
    """Whether bf16 matrix products run several times faster than fp32 ones on `device`.

    CPUs with AMX tiles (Sapphire Rapids and later) multiply bf16 matrices several times faster than fp32
    ones (oneDNN; llama-60m's optimizer at b = 256: 25% faster, docs/benchmarks.md, "Fifth pass"); other CPUs emulate bf16
    slowly. On GPUs POET's direction is bound by kernel launches, not flops (H200: bf16 directions were no
    faster), so they keep fp32.
    """
    if device.type != "cpu":
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private and recent: absent means "do not know"
    return bool(amx and amx()) and torch.backends.mkldnn.is_available()


def choose_direction(method: str, dtype: str, block: int, device: torch.device) -> tuple[str, str]:
    """(orthogonalizer, precision of its products) for (n, block, block) blocks on `device`, resolving "auto".

    Precision "auto" is bf16 where bf16 products are fast (`fast_bf16_products`) from b = BF16_ON_CPU_FROM
    (smaller blocks gain little: conversions and per-call overhead eat it), else fp32; it applies to
    Newton–Schulz only (the exact path always works in at least fp32). Orthogonalizer "auto" is the faster
    one: Newton–Schulz, except on a CPU without fast bf16 products from b = EXACT_ON_CPU_FROM, where
    LAPACK's eigendecomposition plus three products beats Newton–Schulz's twelve fp32 ones (llama-60m's
    optimizer, one core: 0.93 vs 0.99 s at b = 256, 0.32 vs 0.28 s at b = 64) and its directions, exact
    partial isometries, let the map take one product instead of three (`isometry_increment`). On GPUs
    batched `eigh` is 10–20× slower than Newton–Schulz (H200, "GPU" there).
    """
    fast = "auto" in (method, dtype) and fast_bf16_products(device)
    if dtype == "auto":
        dtype = "bf16" if fast and block >= BF16_ON_CPU_FROM else "fp32"
    if method == "auto":
        exact = device.type == "cpu" and block >= EXACT_ON_CPU_FROM and not (fast and dtype == "bf16")
        method = "exact" if exact else "newton_schulz"
    return method, dtype


def orthogonalize_skew(a: torch.Tensor, method: str = "exact", eps: float | None = None) -> torch.Tensor:
    """Skew (..., b, b) -> the skew matrix with the same eigenplanes and every nonzero singular value 1.

    For a skew A, AᵀA = −A² commutes with A, so the polar factor A·(AᵀA)^(−1/2) is skew again. "exact"
    computes it by an eigendecomposition of AᵀA in A's precision (at least float32; the direction's
    precision does not touch the spectrum, the orthogonal map does). Directions with a singular value
    below eps·σ_max stay zero (the kernel of an odd-sized block, and in float32 what eigh cannot resolve:
    eps defaults to 1e-3 there, 1e-7 in float64). "newton_schulz" runs Muon's quintic iteration (4 steps
    from a tighter start, see `_newton_schulz`), an odd polynomial in A (so the result is skew too) whose
    singular values are at most ≈1.2 and land in ≈[0.7, 1.2] for every plane above ~1% of the block's largest
    (fainter ones stay fainter). "auto": see `choose_direction`.
    """
    method = choose_direction(method, "bf16" if a.dtype == torch.bfloat16 else "fp32", a.shape[-1], a.device)[0]
    # The result does not depend on A's scale, but AᵀA and Newton–Schulz's norms overflow or underflow at
    # extreme ones (fp32 momenta of 1e19 or 1e-23): every block starts from entries of at most 1. A skew
    # block's largest entry is its largest magnitude (each entry comes with its negative): no abs pass.
    a = a / a.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if method == "exact":
        wide = a.to(torch.promote_types(a.dtype, torch.float32))
        if eps is None:
            eps = 1e-7 if wide.dtype == torch.float64 else 1e-3
        gram = wide.transpose(-1, -2) @ wide
        try:
            values, vectors = torch.linalg.eigh(gram)
        except torch.linalg.LinAlgError as error:  # LAPACK's message blames conditioning, whatever the cause
            if not torch.isfinite(a).all():
                raise ValueError("cannot orthogonalize skew matrices that hold NaN or inf: a non-finite gradient "
                                 "reached POET (check the loss; poetlm's training loop stops at such a step)") from error
            raise
        floor = eps**2 * values.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(wide.dtype).tiny)
        # ½·(AᵀA)^(−1/2): the halves of the polar factor P and of −Pᵀ make it skew to the last bit
        half_inv_sqrt = torch.where(values > floor, values.clamp_min(floor).rsqrt().mul_(0.5), torch.zeros_like(values))
        polar = wide @ (vectors * half_inv_sqrt.unsqueeze(-2)) @ vectors.transpose(-1, -2)
        return (polar - polar.transpose(-1, -2)).to(a.dtype)
    if method == "newton_schulz":
        return _newton_schulz(a.reshape(-1, *a.shape[-2:])).view(a.shape)  # baddbmm wants one batch dimension
    raise ValueError(f"orthogonalization {method!r} is not one of {ORTHOGONALIZERS}")


NEWTON_SCHULZ_STEPS = 4


def _newton_schulz(a: torch.Tensor) -> torch.Tensor:
    """Muon's quintic x ← 3.4445·x − 4.7750·(xxᵀ)x + 2.0315·(xxᵀ)²x on (n, b, b) blocks, started from a / s.

    The start must have σ_max ≤ 1. Muon divides by the Frobenius norm, which overshoots σ_max by up to √b
    on a flat spectrum; s = ‖(aaᵀ)²‖_F^¼ (the Schatten-8 norm, ≥ σ_max and at most b^⅛·σ_max) comes free
    from the two products the first step needs anyway, and starts every plane up to b^⅜ closer to 1 (8× at
    b = 256 on a flat spectrum, worth ~1.7 steps of the quintic's 3.44× per step). The tests pin what 4
    steps from it reach (tests/test_update_rules.py).
    """
    ratio = -4.7750 / 2.0315  # x ← 3.4445·x + 2.0315·(G² + ratio·G)·x, G = xxᵀ; a's entries are at most 1 here
    gram = a @ a.transpose(-1, -2)
    gram_squared = gram @ gram
    scale = gram_squared.flatten(-2).norm(dim=-1).clamp_min(1e-30).pow(0.25)[:, None, None]
    x = a / scale
    poly = torch.addcmul(gram_squared / scale**4, gram, ratio / scale**2)
    for step in range(NEWTON_SCHULZ_STEPS):
        if step:
            gram = x @ x.transpose(-1, -2)
            poly = torch.baddbmm(gram, gram, gram, beta=ratio)
        x = torch.baddbmm(x, poly, x, beta=3.4445, alpha=2.0315)
    return x


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """σ(W), descending, as a CPU tensor: the spectrum that POET keeps and drift metrics compare. fp64 for
    a float64 weight (fp32 would read its ~1e-15 drift as ~1e-7), else fp32.

    A CPU weight goes through LAPACK's fp32 SVD, which resolves σ to ~1e-6·σ_max. CUDA's fp32 SVD does
    not: it read a 3–4e-5 drift (H200, `benchmarks/gpu_check.py`) on weights whose change matched fp64
    to 2e-6, a noise floor above the drift the metric exists to show; and copying every weight to the
    CPU would make a large model's diagnostics take minutes. So a weight elsewhere stays where it is,
    in fp64 (`gram_singular_values`), whose floor (~1e-11 relative, see there) is far below fp32's but
    above a float64 weight's own ~1e-15: such a weight's drift reads ~1e-11 off a CPU.
    """
    weight = weight.detach()
    precision = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if weight.device.type == "cpu":
        return torch.linalg.svdvals(weight.to(precision))
    return gram_singular_values(weight).to(precision).cpu()


def gram_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """σ(W) as the square roots of the eigenvalues of its smaller fp64 Gram matrix: one product and a
    symmetric eigensolver, both much faster than an SVD on a GPU. Each σ² is off by ≲ 1e-15·σ_max², so σ
    by ≲ 3e-8·σ_max even for σ near 0: far below an fp32 SVD's resolution."""
    wide = weight.double()
    gram = wide.T @ wide if wide.shape[0] >= wide.shape[1] else wide @ wide.T
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()
