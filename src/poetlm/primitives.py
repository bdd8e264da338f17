"""One side of a POET layer: which coordinates rotate together, and applying the rotation.

A side owns its skew parameters and the coordinates they act on:
- BlockStochastic: R = Ψᵀ·Diag(G¹, …, Gᴷ)·Ψ, Ψ a random permutation; every coordinate rotates.
- FullyStochastic: R is the identity except on a random subset S×S, where it is one block G.
Coordinates are drawn from a generator seeded by (seed, layer name, merge count, side), so every
process of a data-parallel job and every resumed run draw the same ones without communication.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import torch
from torch import nn

from .orthogonal import orthogonal_map, skew_from_packed


def seeded_generator(*key) -> torch.Generator:
    """A CPU generator that is a pure function of `key` (stable across processes and Python runs)."""
    digest = hashlib.sha256("\0".join(map(str, key)).encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def plain_name(name: str) -> str:
    """A module's (or a state-dict key's) name in the plain model: without the `_orig_mod` parts that
    torch.compile's wrapper adds, so a compiled model draws the W0 and coordinates of the plain one and
    saves under the plain one's names."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


# Entries one batch of rotation blocks may hold beyond one weight's, by device type. On a GPU POET's
# rotation work is bound by kernel launches (H200, llama-60m: the fold form's optimizer took 48 ms for
# ~1 ms of flops, the layer form's rotation backward 213 ms), so blocks of many weights go through one set
# of products, up to 2²⁵ entries per copy of the blocks (128 MB in fp32; the rule and map hold a few such
# copies). On CPU the products are the cost and bigger batches only add temporaries (measured: batching
# helped small blocks only).
CHUNK_ENTRIES = {"cpu": 0}
GPU_CHUNK_ENTRIES = 2**25


def batch_entries(weight: torch.Tensor) -> int:
    """How many block entries one batch of rotation products may hold, for weights like `weight`."""
    return max(weight.numel(), CHUNK_ENTRIES.get(weight.device.type, GPU_CHUNK_ENTRIES))


def stacks(weight: torch.Tensor) -> bool:
    """Whether weights like `weight` are also stacked whole for their batch (devices with a GPU's batching,
    where one op per weight costs a launch; on CPU the stack would be a copy of each weight for nothing)."""
    return weight.device.type not in CHUNK_ENTRIES


def block_layout(variant: str, dim: int, block_size: int, fraction: float) -> tuple[int, list[int]]:
    """(slot size b, the sizes of the blocks) of one side of a `dim`-wide weight.

    "bs": ⌈dim/b⌉ blocks of b, the last one smaller when b does not divide dim; "fs": one block of
    ⌊β·dim⌋ coordinates, or none when that is below 2 (a 1×1 rotation is the identity).
    """
    if variant == "bs":
        block = min(block_size, dim)
        n_blocks = math.ceil(dim / block)
        return block, [block] * (n_blocks - 1) + [dim - block * (n_blocks - 1)]
    # The decimal β as given (0.29·100 is 29, not 28.999…), and a β written as a ratio reaches its integer:
    # 1/3 is stored as 0.333…3 (17 digits), so 30 of it is 10 less 1e-15, which ⌊·⌋ would make 9.
    size = math.floor(Fraction(repr(float(fraction))) * dim + Fraction(1, 10**9))
    return (size, [size]) if size >= 2 else (1, [])


def require_rotations(variant: str, shape: tuple[int, int], block_size: int, fraction: float, what: str) -> None:
    """Refuse a weight that neither side can rotate (a 1×1 weight, or β·dim < 2 on both sides for "fs"):
    POET could never change it, and training would silently do nothing."""
    if any(max(block_layout(variant, dim, block_size, fraction)[1], default=0) >= 2 for dim in shape):
        return
    fix = "raise fraction (each side rotates ⌊fraction·dim⌋ coordinates, at least 2) or use variant='bs'" if variant == "fs" else ""
    raise ValueError(f"{what} of shape {tuple(shape)} has nothing POET can rotate with variant={variant!r}"
                     f"{f', fraction={fraction}' if variant == 'fs' else ''}: it would never change; "
                     f"{fix + ', or ' if fix else ''}leave it out of POET (exclude_modules, or train it with AdamW)")


def draw_index(variant: str, dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """The coordinates a side rotates, in block order: a permutation ("bs") or a random subset ("fs")."""
    permutation = torch.randperm(dim, generator=generator)
    return permutation if variant == "bs" else permutation[:count]


def index_problem(variant: str, index: torch.Tensor, dim: int, count: int) -> str | None:
    """Why `index` cannot be a side's coordinates (a permutation of range(dim) for "bs", `count` distinct
    coordinates below dim for "fs"), or None. Loaded states are checked: a corrupt one would give wrong
    outputs and no error."""
    if index.is_meta:
        return None
    if index.dim() != 1 or len(index) != count or index.is_floating_point():
        return f"expected {count} integer coordinates, got a {index.dtype} tensor of shape {tuple(index.shape)}"
    ordered = index.sort().values
    if len(index) and (ordered[0] < 0 or ordered[-1] >= dim):
        return f"coordinates outside 0..{dim - 1}"
    if len(index) > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        return "a coordinate appears twice" + (" (not a permutation)" if variant == "bs" else "")
    return None


def select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(dim, index), in x's layout: a transposed matrix (the weight path builds its weight
    as one, and its gradient arrives as one) is gathered as the transpose of a contiguous one, since
    gathering along a strided tensor's rows is many times slower on CPU than gathering a contiguous one's."""
    if x.dim() == 2 and not x.is_contiguous() and x.T.is_contiguous():
        return x.T.index_select(1 - dim % 2, index).T
    return x.index_select(dim, index)


class _Permute(torch.autograd.Function):
    """x permuted along `dim` by `index`, whose inverse is known.

    index_select's backward is a zero fill plus a scatter-add; the transpose of a permutation is its
    inverse, so here backward is one more gather.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.dim = dim
        return select(x, dim, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return select(grad, ctx.dim, inverse), None, None, None


def permute(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x.index_select(dim, index) for a permutation `index` with inverse `inverse` (a gather in backward too)."""
    return _Permute.apply(x, index, inverse, dim) if x.requires_grad else select(x, dim, index)


def transport_blocks(blocks: torch.Tensor, old_index: torch.Tensor, new_index: torch.Tensor, dim: int) -> torch.Tensor:
    """Re-express per-block (n, b, b) matrices, indexed by `old_index`, in the blocks of `new_index`.

    An entry (i, j) of a new block keeps its value when coordinates i and j sat in one old block (the
    plane they span was rotated before and is rotated again); every other entry is zero. This is the
    dense d×d block matrix restricted to the new blocks, without building it.
    """
    n_blocks, block = blocks.shape[0], blocks.shape[-1]
    position = torch.full((dim,), -1, dtype=torch.long, device=blocks.device)
    position[old_index] = torch.arange(len(old_index), device=blocks.device)
    new_position = torch.full((n_blocks * block,), -1, dtype=torch.long, device=blocks.device)
    new_position[: len(new_index)] = position[new_index]
    new_position = new_position.view(n_blocks, block)
    valid = new_position >= 0
    old_block, old_offset = new_position.clamp_min(0) // block, new_position.clamp_min(0) % block
    values = blocks[old_block[:, :, None], old_offset[:, :, None], old_offset[:, None, :]]
    same = valid[:, :, None] & valid[:, None, :] & (old_block[:, :, None] == old_block[:, None, :])
    return torch.where(same, values, torch.zeros_like(values))


class RotationSide(nn.Module):
    """Skew parameters for one side plus the coordinates they rotate. Subclasses define the layout."""

    def __init__(self, dim: int, block: int, block_sizes: list[int]) -> None:
        super().__init__()
        self.dim = dim
        self.block = block
        self.block_sizes = block_sizes
        self.skew = nn.Parameter(torch.zeros(sum(size * (size - 1) // 2 for size in block_sizes)))

    @property
    def n_blocks(self) -> int:
        return len(self.block_sizes)

    @property
    def flops_per_vector(self) -> int:
        """Multiply-adds to rotate one vector: the cost model of the forward-path choice."""
        return sum(size * size for size in self.block_sizes)

    def blocks(self, parameterization: str, terms: int) -> torch.Tensor:
        """The (n_blocks, b, b) rotation blocks, computed in the parameters' dtype (fp32)."""
        return orthogonal_map(self.skew_blocks(), parameterization, terms)

    def skew_blocks(self) -> torch.Tensor:
        return skew_from_packed(self.skew, self.block_sizes, self.block)

    @torch.no_grad()
    def reset(self) -> None:
        self.skew.zero_()

    def coordinate_problem(self) -> str | None:
        """Why the side's coordinate buffers are invalid (`index_problem`), or None."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        problem = self.coordinate_problem()  # a corrupt index loads without error and gives wrong outputs
        if problem:
            args[-1].append(f"{prefix}index: {problem}; the saved state is corrupt or belongs to another model")

    def _rotate_gathered(self, gathered: torch.Tensor, blocks: torch.Tensor, transpose: bool, dim: int) -> torch.Tensor:
        """Rotate gathered coordinates (n_blocks·b of them along `dim`, 0 or -1) block by block; padding
        rides along as zeros. Along dim 0 of a matrix the blocks are one batched product, no layout copies."""
        blocks = (blocks.transpose(-1, -2) if transpose else blocks).to(gathered.dtype)
        if dim == 0:
            return torch.bmm(blocks, gathered.view(self.n_blocks, self.block, -1)).flatten(0, 1)
        grouped = gathered.unflatten(-1, (self.n_blocks, self.block))
        return torch.einsum("kij,...kj->...ki", blocks, grouped).flatten(-2)


class BlockStochastic(RotationSide):
    """Permutation + block-diagonal rotation. When b does not divide dim the last block is smaller."""

    def __init__(self, dim: int, block_size: int) -> None:
        super().__init__(dim, *block_layout("bs", dim, block_size, 1.0))
        self.register_buffer("index", torch.arange(dim))
        self.register_buffer("inverse", torch.arange(dim))

    @torch.no_grad()
    def redraw(self, generator: torch.Generator) -> None:
        permutation = draw_index("bs", self.dim, self.dim, generator)
        self.index.copy_(permutation)
        self.inverse.copy_(torch.argsort(permutation))

    def coordinate_problem(self) -> str | None:
        problem = index_problem("bs", self.index, self.dim, self.dim)
        identity = torch.arange(self.dim, device=self.index.device)
        if problem is None and not self.index.is_meta and not torch.equal(self.index[self.inverse], identity):
            problem = "inverse is not the inverse permutation of index"
        return problem

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False, dim: int = -1) -> torch.Tensor:
        """R·x (or Rᵀ·x) along dimension `dim` of x: the last one, or 0 of a matrix (its columns)."""
        gathered = permute(x, self.index, self.inverse, dim)
        padding = self.n_blocks * self.block - self.dim
        if padding:
            gathered = nn.functional.pad(gathered, (0, 0, 0, padding) if dim == 0 else (0, padding))
        rotated = self._rotate_gathered(gathered, blocks, transpose, dim)
        if padding:  # a slice's backward is a zero fill and a copy of the whole tensor: only where needed
            rotated = rotated.narrow(dim, 0, self.dim)
        return permute(rotated, self.inverse, self.index, dim)


class FullyStochastic(RotationSide):
    """One rotation block on a random subset of ⌊β·dim⌋ coordinates; the rest stay put."""

    def __init__(self, dim: int, fraction: float) -> None:
        super().__init__(dim, *block_layout("fs", dim, 0, fraction))
        self.register_buffer("index", torch.arange(self.block if self.block_sizes else 0))

    @torch.no_grad()
    def redraw(self, generator: torch.Generator) -> None:
        self.index.copy_(draw_index("fs", self.dim, len(self.index), generator))

    def coordinate_problem(self) -> str | None:
        return index_problem("fs", self.index, self.dim, len(self.index))

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False, dim: int = -1) -> torch.Tensor:
        if not self.block_sizes:
            return x
        rotated = self._rotate_gathered(x.index_select(dim, self.index), blocks, transpose, dim)
        # Under CUDA autocast the block product comes back in bf16 while x is fp32: the result takes
        # the product's dtype, as the block-stochastic side's does.
        return x.to(rotated.dtype).index_copy(dim, self.index, rotated)


def rotate_weight(weight: torch.Tensor, side_in: RotationSide, blocks_in: torch.Tensor, side_out: RotationSide,
                  blocks_out: torch.Tensor) -> torch.Tensor:
    """Pᵀ·weight·Rᵀ for an (out, in) weight: every row w → R·w (the input side), then every column
    c → Pᵀ·c (the output side), as `POETLinear` builds its effective weight.

    With permutations on both sides, both rotations run in the permuted frame: one gather of the weight
    per side, a batched product along its rows, a second along the rows of its transpose (a strided view
    that batched products take as is), and one gather back per side. Rotating side after side would gather
    the weight twice more, and the row-wise product would copy its layout around the block products. The
    result is the transpose of a contiguous (in, out) tensor, which F.linear takes as it is.
    """
    if not (isinstance(side_in, BlockStochastic) and isinstance(side_out, BlockStochastic)):
        return side_out.rotate(side_in.rotate(weight, blocks_in), blocks_out, transpose=True, dim=0)
    frame = permute(permute(weight, side_out.index, side_out.inverse, 0), side_in.index, side_in.inverse, 1)
    width_out, width_in = side_out.n_blocks * side_out.block, side_in.n_blocks * side_in.block
    if (width_out, width_in) != frame.shape:
        frame = nn.functional.pad(frame, (0, width_in - side_in.dim, 0, width_out - side_out.dim))
    blocks_out, blocks_in = blocks_out.to(frame.dtype), blocks_in.to(frame.dtype)
    columns_rotated = torch.bmm(blocks_out.transpose(-1, -2), frame.view(side_out.n_blocks, side_out.block, width_in))
    transposed = torch.bmm(blocks_in, columns_rotated.view(width_out, width_in).T.view(side_in.n_blocks, side_in.block, width_out))
    transposed = transposed.view(width_in, width_out)
    if (width_out, width_in) != weight.shape:  # a slice's backward is a zero fill and a copy: only where needed
        transposed = transposed[: side_in.dim, : side_out.dim]
    transposed = permute(transposed, side_in.inverse, side_in.index, 0)
    return permute(transposed, side_out.inverse, side_out.index, 1).T


def make_side(variant: str, dim: int, block_size: int, fraction: float) -> RotationSide:
    return BlockStochastic(dim, block_size) if variant == "bs" else FullyStochastic(dim, fraction)
