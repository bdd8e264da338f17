"""POET as an optimizer: rotate ordinary weights every step, W ← R_out · W · R_inᵀ.

Folding the rotations into the weight after every step (merge_every = 1) leaves no reparameterization
to carry: at Q = 0 the gradient of the loss with respect to a block's skew parameter is a function of
the ordinary weight gradient G. For one side, with X the weight seen from that side (W for the output
side, Wᵀ for the input side, so its rows are the side's coordinates) and H the matching gradient, the
rows of block k are X_k = X[index_k]; the rotation X_k ← orthogonal_map(Q_k)·X_k ≈ (I + 2Q_k)·X_k changes
the loss by ⟨H_k, 2Q_k X_k⟩, so

    ∂loss/∂Q_k = 2·(H_k X_kᵀ − X_k H_kᵀ)     (skew, b×b)

which is what autograd gives the layer form (`POETLinear`) at Q = 0 for its input side, and the negative of
it for its output side (the layer applies Pᵀ there, the fold R). A `RotationRule` turns it
into a direction, and the rotation built from it is folded into the weight in place as X + (R − I)·X, in the weight's
precision (see `rotation_increment`). Singular values change only by rounding. Coordinates (permutations or
subsets) are redrawn every `rule.redraw_every` steps from seeded generators, as in the layer form.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import warnings
from typing import Callable

import torch

from .config import POETConfig, POETWarning, checked, is_number
from .layer import is_shard, whole_value
from .orthogonal import generator_scale, isometry_increment, rotation_increment, singular_values
from .primitives import batch_entries, block_layout, draw_index, index_problem, plain_name, require_rotations, seeded_generator, stacks, transport_blocks
from .update_rules import RuleConfig, make_rule

SIDES = ("out", "in")


class Scratch:
    """Weight-sized scratch tensors that every weight of one optimizer step reuses.

    A fresh weight-sized tensor per gather costs page faults on CPU (large frees go back to the OS) and
    allocator traffic on GPUs; the step keeps one per (role, shape) and drops them all when it ends.
    """

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (role, shape, like.dtype, like.device)
        if key not in self.tensors:
            self.tensors[key] = like.new_empty(shape)
        return self.tensors[key]


def side_blocks(tensor: torch.Tensor, side: str, index: torch.Tensor, block: int, n_blocks: int,
                scratch: Scratch | None = None, role: str = "weight", padded: torch.Tensor | None = None) -> torch.Tensor:
    """One side's rows (of W for "out", of Wᵀ for "in") at `index`, as (n_blocks, b, cols).

    A short last block is zero-padded. The input side gathers columns of the tensor itself and returns a
    transposed view of them (batched products take those strides as they are): gathering rows of the
    strided Wᵀ was the single largest cost of a step. With `scratch`, the gather lands in a reused tensor;
    `padded` is `padded_index(index, n_blocks * block)`, if the caller keeps one.
    """
    scratch = scratch or Scratch()
    count, width = len(index), n_blocks * block
    if side == "out":
        rows = scratch.get(role, (width, tensor.shape[1]), tensor)
        torch.index_select(tensor, 0, index, out=rows[:count])
        if count < width:
            rows[count:].zero_()
        return rows.view(n_blocks, block, tensor.shape[1])
    columns = scratch.get(role, (tensor.shape[0], width), tensor)
    torch.index_select(tensor, 1, padded_index(index, width) if padded is None else padded, out=columns)
    if count < width:
        columns[:, count:].zero_()
    return columns.view(tensor.shape[0], n_blocks, block).permute(1, 2, 0)


def padded_index(index: torch.Tensor, width: int) -> torch.Tensor:
    """`index` filled up to `width` with repeats of its first entries: the input side gathers some
    columns twice into its padding, then zeroes them (a strided `out=` is slow)."""
    return index if len(index) >= width else torch.cat([index, index[: width - len(index)]])


def fold_side(weight: torch.Tensor, side: str, index: torch.Tensor, blocks: torch.Tensor, increment: torch.Tensor,
              scratch: Scratch, inverse: torch.Tensor | None = None) -> None:
    """weight ← R·X on one side, X = `side_blocks(weight, …)`: X + (R − I)·X, written back at `index`
    (`inverse` = argsort(index), if the caller keeps one)."""
    count = len(index)
    whole = count == (weight.shape[0] if side == "out" else weight.shape[1]) and weight.is_contiguous()
    if whole and inverse is None:
        inverse = torch.argsort(index)
    if side == "out":
        spare = scratch.get("spare", (blocks.shape[0] * blocks.shape[1], blocks.shape[2]), weight)  # the grad's
        rotated = torch.baddbmm(blocks, increment, blocks, out=spare.view(blocks.shape))
        rows = rotated.flatten(0, 1)[:count]
        if whole:  # a gather by the inverse permutation into the weight beats a scatter by the permutation
            torch.index_select(rows, 0, inverse, out=weight)
        else:
            weight.index_copy_(0, index, rows)
        return
    # Input side, in the layout of the gathered columns: Xᵀ + Xᵀ·(R − I)ᵀ, one (d_out, b) slab per block.
    n_blocks, block, height = blocks.shape
    slabs = blocks.transpose(1, 2)
    columns = scratch.get("spare", (height, n_blocks * block), weight)  # the grad's gather, no longer needed
    torch.baddbmm(slabs, slabs, increment.transpose(1, 2), out=columns.view(height, n_blocks, block).transpose(0, 1))
    if whole:
        torch.index_select(columns[:, :count], 1, inverse, out=weight)
    else:
        weight.index_copy_(1, index, columns[:, :count])


_cached_layout = functools.lru_cache(maxsize=None)(block_layout)  # called per weight and side every step


def _chunks(members: list, weight: torch.Tensor, block_elements: int, spread: int = 1) -> list[list]:
    """Split a batch of weights shaped like `weight` so that each chunk's blocks hold no more entries than
    `primitives.batch_entries` allows (one weight's on CPU), and into at least `spread` chunks where there
    are that many weights (processes that split the work take a chunk each).

    Many weights' (n, b, b) blocks at once save launches and per-op overhead where blocks are small; at
    large b one weight's blocks are big products already, and a whole batch's rule and map temporaries
    (several copies of the blocks) would cost memory instead. Sharded weights go one at a time: each is
    gathered whole for its step, and FSDP's memory saving must not come back in the optimizer. Where a
    chunk's weights are stacked (`primitives.stacks`), each stacked copy of them is held to the same bound.
    """
    if is_shard(weight):
        return [[member] for member in members]
    entries = max(block_elements, weight.numel() if stacks(weight) else 0, 1)
    per_chunk = max(1, min(batch_entries(weight) // entries, -(-len(members) // spread)))
    return [members[i: i + per_chunk] for i in range(0, len(members), per_chunk)]


def stack_rows(tensors: list[torch.Tensor], side: str) -> torch.Tensor:
    """Same-shaped tensors' rows seen from `side` (W's for "out", Wᵀ's for "in"), one tensor's after
    another's: (n·dim, other), contiguous."""
    return torch.stack(tensors if side == "out" else [tensor.t() for tensor in tensors]).flatten(0, 1)


def skew_gradient(x: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """∂loss/∂Q_k = 2·(H_k X_kᵀ − X_k H_kᵀ) from a side's (n, b, cols) weight blocks X and gradient blocks H
    (module docstring), into `out` if given (a chunk's joined blocks: no concatenation after)."""
    if x.dtype != h.dtype or x.dtype not in (torch.float32, torch.float64):  # a no-op cast is a dispatch too
        wide = torch.promote_types(x.dtype, torch.float32)
        x, h = x.to(wide), h.to(wide)
    # beta=0: the input is never read, so an empty one will do; the 2 costs no pass of its own
    product = torch.baddbmm(h.new_empty(()), h, x.transpose(-1, -2), beta=0, alpha=2)
    return torch.sub(product, product.transpose(-1, -2), out=out)


def _join(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors), or, when they are the consecutive parts of one tensor, that tensor itself."""
    base = tensors[0]._base
    if base is not None and base.is_contiguous():
        expected = base.storage_offset()
        for tensor in tensors:
            if tensor._base is not base or not tensor.is_contiguous() or tensor.storage_offset() != expected:
                break
            expected += tensor.numel()
        else:
            if expected - base.storage_offset() == base.numel():
                return base
    return torch.cat(tensors)


def _require_finite(grads: list[torch.Tensor]) -> None:
    """Refuse a step on a NaN or inf gradient before any momentum or weight changes, whatever the rule's
    path (the exact orthogonalization used to fail only after the momentum had taken it in, Newton–Schulz
    not at all), so a loop that skips the batch goes on from the state before it. One synchronizing check
    per device; a shard's flag is reduced over its mesh, so every rank raises alike."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        # One pass instead of isfinite's three: a NaN or inf makes the sum non-finite. Only a sum that
        # overflowed from finite entries needs the exact check.
        flag = torch.isfinite(whole_value(grad.sum()))
        flags.setdefault(flag.device, []).append(flag)
    if not all(torch.stack(device_flags).all() for device_flags in flags.values()) and \
            not all(bool(whole_value(torch.isfinite(grad).all())) for grad in grads):
        raise ValueError("a non-finite gradient (NaN or inf) reached the optimizer; no weight or optimizer state was "
                         "changed: skip this batch (optimizer.zero_grad()) and check the loss")


def _evaluate(closure):
    """torch.optim's closure convention: re-evaluate the loss, with gradients, before stepping."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class POET(torch.optim.Optimizer):
    """Rotates each 2-D parameter on both sides; its singular values stay those it had at the first step.

    params: the weights to train this way (the block linears' `weight`; no biases, norms or embeddings:
        train those with AdamW beside it), in float32 or float64. lr: the step size of the rule; for
        "orthogonalized" the angle in radians each rotation plane turns per step (0.02 was best at `tiny`).
    poet: block layout (variant, block_size, fraction), the orthogonal map and the seed of the coordinates.
    rule: the update rule (default: orthogonalized momentum, Nesterov, alternating sides).
    gather: for sharded weights (FSDP2): `gather(tensor)` is a context manager within which the tensor is
        whole and on whose exit each rank's shard takes the whole value (`poetlm.train.parallel.whole_tensor`).
        Each weight is gathered by itself for its step and rotated alike on every rank; gradients and
        spectra are only read, so they are gathered without it.
    split: for data-parallel replicas (DDP), an object with `rank`, `world` and `broadcast([(tensor, src),
        …])` (`poetlm.train.parallel.RankSplit`). Every process still updates every momentum (all hold the
        same averaged gradient), but each chunk of weights is orthogonalized, mapped and folded by one
        process, round-robin, and broadcast to the others: the rotation work per process shrinks with the
        number of processes instead of being repeated on each.
    compile: a torch.compile backend (e.g. "inductor") for the block math, the rule's orthogonalization and
        the map: elementwise passes fused, fewer launches. Chunks of a new size compile once more, then
        sizes become dynamic; learning rates and redraws never recompile.
    transposed: the names of the parameters stored as (in, out), such as transformers' Conv1D weights
        (`poet_optimizer` finds them). Their rows are the input side: its coordinates are drawn and its turns
        alternate as a `POETConv1D`'s do. A side's state stays keyed by the stored tensor ("out": its rows,
        "in": its columns), so checkpoints read the same either way.
    """

    def __init__(self, params, lr: float = 0.02, poet: POETConfig | None = None, rule: RuleConfig | None = None,
                 gather: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None, split=None,
                 compile: str | None = None, transposed=()) -> None:
        self.poet = checked(poet or POETConfig(), POETConfig)  # before torch's __init__: add_param_group checks against it
        super().__init__(params, {"lr": lr})
        self.gather, self.split, self.compile_backend = gather, split, compile
        self.rule_config = checked(rule or RuleConfig(), RuleConfig)
        self.transposed = self._checked_transposed(transposed)
        self._build()

    _SETTINGS = ("poet", "rule_config", "gather", "split", "compile_backend", "transposed")

    def _checked_transposed(self, transposed) -> frozenset:
        """`transposed` as a set of names, refusing one that is not a parameter's: that weight would turn the wrong sides."""
        transposed = frozenset([transposed] if isinstance(transposed, str) else transposed)
        names = {name for group in self.param_groups for name in group.get("param_names", ())}
        unknown = sorted(transposed - names)
        if unknown:
            raise ValueError(f"POET(transposed=…) names {unknown[0]!r}, which is not the name of a parameter it trains: "
                             "give the parameters with their names (model.named_parameters()) and use those names")
        return transposed

    def _build(self) -> None:
        """The rule and the block math, made from the settings: by the constructor, and again by a copy
        (compiled functions do not pickle, and cached index forms are keyed by the original's state ids)."""
        self.rule = make_rule(self.rule_config)
        self._increment = rotation_increment
        if self.compile_backend:
            self._increment = torch.compile(rotation_increment, backend=self.compile_backend)
            if hasattr(self.rule, "orthogonalize"):
                self.rule.orthogonalize = torch.compile(self.rule.orthogonalize, backend=self.compile_backend)
        self._derived: dict[tuple, tuple] = {}  # see _index_forms and _stack_forms
        self._warned_idle = False  # see step

    def __getstate__(self) -> dict:  # torch's keeps only defaults, state and param_groups
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._SETTINGS}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._build()

    def add_param_group(self, param_group: dict) -> None:
        """torch's, for the constructor's groups and later ones alike, refusing a group POET cannot train
        before any step could half apply (a bad weight in the second group fails after the first turned)."""
        super().add_param_group(param_group)  # normalizes the group first: named parameters, the default lr
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    # Other optimizers' settings, which a group copied from theirs would carry and POET would never read. Weight
    # decay would shrink the singular values POET keeps; its momentum is the rule's. (Bookkeeping keys, such as
    # a name or a scheduler's initial_lr, are a group's own business.)
    _OTHER_OPTIMIZERS_KEYS = {"weight_decay", "momentum", "betas", "eps", "nesterov", "dampening", "amsgrad"}

    def _check_group(self, group: dict) -> None:
        unread = sorted(set(group) & self._OTHER_OPTIMIZERS_KEYS)
        if unread:
            raise ValueError(f"POET param groups take no {', '.join(unread)}: never read (POET keeps every weight's "
                             "singular values, so it has no weight decay; its momentum is RuleConfig.beta1): drop them")
        self._check_lr(group["lr"], "lr={!r} is invalid: must be a finite number > 0 (e.g. 0.02)", positive=True)
        if len({id(param) for param in group["params"]}) < len(group["params"]):  # torch only warns: it would turn twice a step
            raise ValueError("a parameter is listed twice in one POET param group, so each step would rotate it twice: list it once")
        names = group.get("param_names") or [None] * len(group["params"])
        for name, param in zip(names, group["params"]):
            what = f"{name!r} of shape {tuple(param.shape)}" if name else f"a parameter of shape {tuple(param.shape)}"
            if param.dim() != 2:
                raise ValueError(f"POET rotates matrices; got {what} (train biases, norms and embeddings with AdamW)")
            if param.is_complex() or not param.is_floating_point():
                raise ValueError(f"POET rotates real floating-point matrices; got {what} of dtype {param.dtype}")
            self._check_precision(param)
            require_rotations(self.poet.variant, tuple(param.shape), self.poet.block_size, self.poet.fraction,
                              "a parameter" if name is None else f"parameter {name!r}")

    @staticmethod
    def _check_lr(lr, problem: str, positive: bool) -> None:
        """Refuse an lr that is not a finite number above 0 (`positive`) or at least 0 (at a step: a warmup starts
        at 0); `problem` formats the message with the value."""
        if not (is_number(lr) and math.isfinite(lr) and (lr > 0 if positive else lr >= 0)):
            raise ValueError(f"POET {problem.format(lr)}")

    @staticmethod
    def _check_precision(param: torch.Tensor) -> None:
        """Checked at every step too: a weight cast after construction (`W.data = W.data.bfloat16()`) would
        otherwise train on, its spectrum drifting."""
        if param.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"POET folds a rotation into each weight every step, so a {param.dtype} weight of shape "
                             f"{tuple(param.shape)} would lose its spectrum to rounding step after step: keep the "
                             "weights in float32 and train in bf16 with torch.autocast")

    def _layout(self, dim: int) -> tuple[int, list[int]]:
        cfg = self.poet
        return _cached_layout(cfg.variant, dim, cfg.block_size, cfg.fraction)

    def _side(self, param: torch.Tensor, side: str, state: dict) -> tuple[torch.Tensor, int, int]:
        """(the side's index, slot size b, number of blocks)."""
        block, sizes = self._layout(self._side_view(param, side).shape[0])
        return state[side]["index"], block, len(sizes)

    def _index_forms(self, state: dict, side: str, weight: torch.Tensor, width: int) -> tuple:
        """(padded index, inverse permutation or None) of a side's current index, derived once per draw:
        every kernel a step saves counts where steps are launch-bound (GPUs). Kept apart from the state so
        that checkpoints do not carry them; a new index (a redraw, a loaded state) is a new entry."""
        key, index = (id(state), side), state[side]["index"]
        cached = self._derived.get(key)
        if cached is None or cached[0] is not index:
            permutation = len(index) == self._side_view(weight, side).shape[0]
            cached = self._derived[key] = (index, padded_index(index, width), torch.argsort(index) if permutation else None)
        return cached[1:]

    def _draw(self, key: int, sides: tuple[str, str], side: str, dim: int, draws: int, device) -> torch.Tensor:
        _, sizes = self._layout(dim)
        # Seeded by the layer form's name of the side (`sides`: see _keys), so the coordinates are a POET layer's.
        generator = seeded_generator(self.poet.seed, key, draws, SIDES[sides.index(side)])
        return draw_index(self.poet.variant, dim, sum(sizes), generator).to(device)

    def _keys(self):
        """(seed key, sides, group, parameter): the same coordinates on every rank and after every resume.

        Given named parameters (`POET(model.named_parameters() …)` or `rotated_weights`), the key of
        "a.b.weight" is the module name "a.b" (`plain_name`), so coordinates and W0 match a POETLinear named
        "a.b" with the same seed; otherwise it is the parameter's position. `sides`: the stored tensor's
        sides ("out": rows, "in": columns) in the layer form's order, the output side first: ("in", "out")
        for a weight stored transposed.
        """
        position = 0
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, param in zip(names, group["params"]):
                sides = SIDES[::-1] if name in self.transposed else SIDES
                yield (plain_name(name.removesuffix(".weight")) if name else position), sides, group, param
                position += 1

    @staticmethod
    def _side_view(weight: torch.Tensor, side: str) -> torch.Tensor:
        return weight if side == "out" else weight.t()

    def _init_state(self, key: int, sides: tuple[str, str], param: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        state["draws"] = 0
        state["initial_spectrum"] = singular_values(param)
        for side in SIDES:
            dim = self._side_view(param, side).shape[0]
            state[side] = {"index": self._draw(key, sides, side, dim, 0, param.device), "rule": {}}

    def _redraw(self, key: int, sides: tuple[str, str], param: torch.Tensor, state: dict) -> None:
        state["draws"] += 1
        for side in SIDES:
            side_state = state[side]
            dim = self._side_view(param, side).shape[0]
            old, new = side_state["index"], self._draw(key, sides, side, dim, state["draws"], param.device)
            self.rule.after_redraw(side_state["rule"], lambda blocks: transport_blocks(blocks, old, new, dim))
            side_state["index"] = new

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        batches: dict[tuple, list] = {}
        for key, sides, group, param in self._keys():
            if param.grad is not None:
                self._check_precision(param)
                # Weights with one shape, orientation, lr and step count turn as one batch of blocks (one set of products).
                batch = (tuple(param.shape), sides, param.dtype, param.device, group["lr"], self.state[param].get("step", 0))
                batches.setdefault(batch, []).append((key, param))
        if not batches and not self._warned_idle:
            self._warned_idle = True  # once: a loop that calls step() before its first backward is no news after that
            warnings.warn(f"POET.step(): none of its {sum(len(g['params']) for g in self.param_groups)} weights has a "
                          "gradient, so nothing turned; were they replaced after the optimizer was built (poetize, a "
                          "new model, loaded weights as new tensors) or left out of the forward pass?", POETWarning, stacklevel=2)
        _require_finite([param.grad for params in batches.values() for _, param in params])
        for index, group in enumerate(self.param_groups):  # a scheduler's value, before any weight turns
            self._check_lr(group["lr"], f"param group {index}: lr={{!r}} cannot be stepped with, no weight or state was "
                           "changed: an lr must be finite and at least 0 (check the lr scheduler)", positive=False)
        scratch, folded_by, count = Scratch(), [], 0
        for (_, sides, *_, lr, step), params in batches.items():
            example = params[0][1]
            spread = self.split.world if self.split else 1
            for chunk in _chunks(params, example, self._side_block_elements(example), spread):
                owner = count % self.split.world if self.split else None
                count += 1
                with contextlib.ExitStack() as whole:  # sharded weights: rotated whole, shards written back on exit
                    members = [self._member(key, sides, param, whole) for key, param in chunk]
                    self._rotate(members, sides, lr, step, scratch, fold=owner is None or owner == self.split.rank)
                folded_by += [(param, owner) for _, param in chunk]
        if self.split:
            self.split.broadcast(folded_by)
        return loss

    def _whole(self, tensor: torch.Tensor, stack: contextlib.ExitStack) -> torch.Tensor:
        if not is_shard(tensor):
            return tensor
        if self.gather is None:
            raise ValueError("POET rotates whole weights, but this process holds a shard of one (FSDP2): pass "
                             "gather= (e.g. POET(..., gather=poetlm.train.parallel.whole_tensor))")
        return stack.enter_context(self.gather(tensor))

    def _member(self, key, sides: tuple[str, str], param: torch.Tensor,
                stack: contextlib.ExitStack) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(whole weight, whole gradient, state) of a parameter, its coordinates drawn or redrawn if due."""
        weight, state = self._whole(param, stack), self.state[param]
        if not state:
            self._init_state(key, sides, weight, state)
        elif state["step"] % self.rule_config.redraw_every == 0:
            self._redraw(key, sides, weight, state)
        return weight, whole_value(param.grad), state  # read only: nothing to write back

    def _side_block_elements(self, param: torch.Tensor) -> int:
        """Entries of the larger side's (n, b, b) blocks of one weight."""
        sizes = [self._layout(self._side_view(param, side).shape[0]) for side in SIDES]
        return max(block * block * len(blocks) for block, blocks in sizes)

    def _rotate(self, members: list[tuple[torch.Tensor, torch.Tensor, dict]], sides: tuple[str, str], lr: float, step: int,
                scratch: Scratch, fold: bool = True) -> None:
        """One step of a chunk of same-shaped weights (`sides`: see _keys); without `fold`, the momenta only (another
        process folds).

        Where steps are launch-bound (`primitives.stacks`: GPUs), a chunk's weights and gradients are
        stacked so that each gather, product and write-back is one op for the whole chunk; elsewhere each
        weight is gathered into reused scratch, one at a time.
        """
        cfg, rule_cfg = self.poet, self.rule_config
        layouts = {side: self._side(members[0][0], side, members[0][2]) for side in SIDES}
        # A side of one coordinate (or none: fs with β·dim < 2) cannot turn: alternation skips it, or every
        # other step would do nothing. `require_rotations` leaves at least one side that can.
        turning = [side for side in sides if layouts[side][1] >= 2]  # the output side first: it turns on even steps
        active = () if not fold else tuple(turning) if not rule_cfg.alternate else (turning[step % len(turning)],)
        stacked = len(members) > 1 and stacks(members[0][0])
        increments, gathered = {}, {}
        for side in turning:  # every side's state sees every step's gradient, active or not
            _, block, n_blocks = layouts[side]
            if stacked:
                x = self._stacked_blocks([weight for weight, _, _ in members], members, side)
                grads = skew_gradient(x, self._stacked_blocks([grad for _, grad, _ in members], members, side))
                if active[:1] == (side,):  # the first side to fold sees these weights still unchanged
                    gathered[side] = x
            else:
                joined = None if len(members) == 1 else members[0][0].new_empty(len(members) * n_blocks, block, block)
                for i, (weight, grad, state) in enumerate(members):
                    index = state[side]["index"]
                    padded, _ = self._index_forms(state, side, weight, n_blocks * block)
                    x = side_blocks(weight, side, index, block, n_blocks, scratch, "weight", padded)
                    h = side_blocks(grad, side, index, block, n_blocks, scratch, "spare", padded)
                    grads = skew_gradient(x, h, None if joined is None else joined[i * n_blocks: (i + 1) * n_blocks])
                if joined is not None:
                    grads = joined
            states = [state[side]["rule"] for _, _, state in members]
            direction = self._direction(grads, n_blocks, states, side in active)
            if direction is not None:
                scale, direction = -lr * generator_scale(cfg.parameterization), direction.to(members[0][0].dtype)
                folding = self._fold_map(scale)
                if getattr(self.rule, "isometric", lambda _: False)(direction):
                    increments[side] = isometry_increment(direction, scale, folding, cfg.neumann_terms)
                else:
                    increments[side] = self._increment(scale * direction, folding, cfg.neumann_terms)
        for side in active:  # in turn: the second side sees the weight after the first side's rotation
            if side not in increments:
                continue
            _, block, n_blocks = layouts[side]
            if stacked:
                self._fold_stacked(members, side, increments[side], gathered.pop(side, None))
                continue
            for (weight, _, state), increment in zip(members, increments[side].split(n_blocks)):
                index = state[side]["index"]
                padded, inverse = self._index_forms(state, side, weight, n_blocks * block)
                x = side_blocks(weight, side, index, block, n_blocks, scratch, "weight", padded)
                fold_side(weight, side, index, x, increment, scratch, inverse)
        for _, _, state in members:
            state["step"] += 1

    def _fold_map(self, scale: float) -> str:
        """The map that folds a step Q = scale·D: the configured one, unless that is a truncated Cayley–Neumann
        series not orthogonal to 1e-12 at this step, whose error every fold would add to the spectrum; then
        the exact Cayley transform, which the series approximates.

        CNP_k = Cayley·(I − Q^(k+1)): for odd k that factor scales singular values by 1 ± ‖Q‖₂^(k+1), for even
        k by √(1 + ‖Q‖₂^(2k+2)). Orthogonalized directions have ‖D‖₂ ≤ 1.2, so ‖Q‖₂ is bounded by the lr alone:
        the default (k = 4, lr ≤ 0.1) keeps the series; odd k or large steps fold exactly. A rule without that
        bound (lie_adam: ‖D‖₂ up to ~√b) always folds exactly.
        """
        cfg = self.poet
        if cfg.parameterization != "cayley_neumann":
            return cfg.parameterization
        if not getattr(self.rule, "bounded", False):
            return "cayley"
        norm, k = 1.2 * abs(scale), cfg.neumann_terms
        error = norm ** (k + 1) if k % 2 else 0.5 * norm ** (2 * k + 2)
        return cfg.parameterization if error < 1e-12 else "cayley"

    def _stack_forms(self, members: list, side: str) -> tuple:
        """A chunk's stacked rows (`stack_rows`) seen as one: (gather index into its blocks, their padding
        rows, and either the inverse gather for a permutation or (targets, sources) for a subset), joined
        from each member's `_index_forms` once per draw."""
        states = [state for _, _, state in members]
        indices = tuple(state[side]["index"] for state in states)
        key = (tuple(id(state) for state in states), side)
        cached = self._derived.get(key)
        if cached is None or any(old is not new for old, new in zip(cached[0], indices)):
            dim = self._side_view(members[0][0], side).shape[0]
            block, sizes = self._layout(dim)
            width, count, device = block * len(sizes), len(indices[0]), indices[0].device
            forms = [self._index_forms(state, side, weight, width) for weight, _, state in members]
            spans = [(i * dim, i * width) for i in range(len(members))]  # where member i's rows start: stacked, gathered
            gather = torch.cat([padded + start for (padded, _), (start, _) in zip(forms, spans)])
            padding = torch.cat([torch.arange(count, width, device=device) + at for _, at in spans])
            if forms[0][1] is not None:  # permutations
                write = torch.cat([inverse + at for (_, inverse), (_, at) in zip(forms, spans)])
            else:
                write = (torch.cat([index + start for index, (start, _) in zip(indices, spans)]),
                         torch.cat([torch.arange(count, device=device) + at for _, at in spans]))
            cached = self._derived[key] = (indices, gather, padding, write)
        return cached[1:]

    def _stacked_blocks(self, tensors: list[torch.Tensor], members: list, side: str) -> torch.Tensor:
        """The chunk's `side_blocks`, all weights' blocks in one (n·n_blocks, b, cols) tensor."""
        gather, padding, _ = self._stack_forms(members, side)
        rows = stack_rows(tensors, side).index_select(0, gather)
        if len(padding):
            rows.index_fill_(0, padding, 0)
        return rows.view(-1, self._layout(self._side_view(tensors[0], side).shape[0])[0], rows.shape[-1])

    def _fold_stacked(self, members: list, side: str, increment: torch.Tensor, blocks: torch.Tensor | None) -> None:
        """`fold_side` for a whole stacked chunk: one product, one write-back gather, one copy into the weights
        (`blocks`: the chunk's `_stacked_blocks` if the caller still holds them for the current weights)."""
        weights = [weight for weight, _, _ in members]
        _, _, write = self._stack_forms(members, side)
        if blocks is None:
            blocks = self._stacked_blocks(weights, members, side)
        rotated = torch.baddbmm(blocks, increment, blocks).flatten(0, 1)
        if isinstance(write, tuple):  # a subset of the rows turns: the others stay as they are
            rows = stack_rows(weights, side)
            rows.index_copy_(0, write[0], rotated.index_select(0, write[1]))
        else:
            rows = rotated.index_select(0, write)
        rows = rows.view(len(weights), -1, rows.shape[-1]).unbind(0)
        torch._foreach_copy_(weights, rows if side == "out" else [row.t() for row in rows])

    def _direction(self, grads: torch.Tensor, n_blocks: int, states: list[dict], active: bool) -> torch.Tensor | None:
        """The rule's direction for several weights' blocks at once (`grads`: n_blocks of each, in turn).

        Their states are joined for the rule and each state keeps its part of the joined tensors as a view,
        so from the next step on the join is the tensor they already share: no concatenation and no copy
        back per weight (after a redraw replaced them, one concatenation joins them again).
        """
        if len(states) == 1:
            return self.rule.direction(grads, states[0], active=active)
        joined = {key: _join([state[key] for state in states]) if torch.is_tensor(value) else value
                  for key, value in states[0].items()}
        direction = self.rule.direction(grads, joined, active=active)
        for key, value in joined.items():
            if torch.is_tensor(value):
                if not all(torch.is_tensor(state.get(key)) and state[key]._base is value for state in states):
                    for state, part in zip(states, value.split(n_blocks)):
                        state[key] = part
            else:
                for state in states:
                    state[key] = value
        return direction

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, refusing a state this optimizer could not continue from (then it keeps its own): a wrong
        one would fail at the next step with an unrelated shape error, or silently train on wrong coordinates."""
        before = self.state, self.param_groups
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            problem = self._state_problem(param, state)
            if problem:
                self.state, self.param_groups = before
                raise ValueError(f"POET.load_state_dict: {problem}; the state is corrupt or was saved with other POET settings")

    def _state_problem(self, param: torch.Tensor, state: dict) -> str | None:
        if not state:  # not stepped yet
            return None
        shape = tuple(param.shape)
        missing = sorted({"step", "draws", "initial_spectrum", *SIDES} - set(state))
        if missing:
            return f"the state of a {shape} weight lacks {missing} (it holds {sorted(state)}: another optimizer's?)"
        for side in SIDES:
            index = state[side]["index"] = state[side]["index"].long()  # torch casts state to the parameter's dtype
            dim = self._side_view(param, side).shape[0]
            problem = index_problem(self.poet.variant, index, dim, sum(self._layout(dim)[1]))
            if problem:
                return f"the {side} side's coordinates of a {shape} weight: {problem}"
            problem = self._rule_state_problem(param, side, state[side]["rule"])
            if problem:
                return f"the {side} side's {self.rule_config.name} state of a {shape} weight: {problem}"
        return None

    def _rule_state_problem(self, param: torch.Tensor, side: str, saved: dict) -> str | None:
        """Whether the rule can take a step from (a copy of) `saved` and leaves it with the keys and shapes
        a fresh state gets: any rule's layout, and the older layouts it still reads, without listing them."""
        if not saved:  # nothing kept yet, or restarted at a redraw
            return None
        block, sizes = self._layout(self._side_view(param, side).shape[0])
        grad = torch.zeros(len(sizes), block, block, dtype=param.dtype, device=param.device)  # a plain tensor for a shard too
        fresh, trial = {}, {key: value.clone() if torch.is_tensor(value) else value for key, value in saved.items()}
        self.rule.direction(grad, fresh, active=False)

        def shapes(state: dict) -> dict:
            return {key: tuple(value.shape) if torch.is_tensor(value) else type(value).__name__ for key, value in state.items()}

        try:
            self.rule.direction(grad, trial, active=False)
            fits = shapes(trial) == shapes(fresh)
        except (RuntimeError, IndexError):  # e.g. momenta of other block sizes
            fits = False
        return None if fits else f"expected {shapes(fresh)}, got {shapes(saved)}"

    @torch.no_grad()
    def spectrum_drift(self) -> float:
        """max over parameters of max_i |σ_i(W) − σ_i(W at its first step)| / σ_max(W at its first step).
        Collective for sharded weights: every rank calls it."""
        drifts = [0.0]
        for *_, param in self._keys():
            state = self.state.get(param)
            if state:
                initial = state["initial_spectrum"].cpu()  # a loaded state sits on the parameter's device
                sigma = singular_values(whole_value(param))
                drifts.append(float((sigma - initial).abs().max() / initial.max()))
        return max(drifts)


class Chained(torch.optim.Optimizer):
    """Several optimizers stepped as one, for loops that take a single optimizer (Trainer, accelerate).

    `param_groups` is the children's groups themselves, so LR schedulers, Trainer's lr logging and
    `zero_grad` act on the real groups; `state_dict` keeps one entry per child.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        self.optimizers = []  # torch's __init__ registers a group of its own; with no children it goes nowhere
        super().__init__(params, {})
        self.optimizers = list(optimizers)

    # Read through to the children every time: a child's load_state_dict replaces its group dicts.
    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns its own: the children own them
        pass

    def __getstate__(self) -> dict:  # torch's keeps state and param_groups, which are the children's
        return {"defaults": self.defaults, "optimizers": self.optimizers}

    def add_param_group(self, param_group: dict) -> None:
        if not self.optimizers:  # torch's __init__ registering its own group: the children own the groups
            return
        children = ", ".join(f"[{i}] {type(o).__name__}" for i, o in enumerate(self.optimizers))
        raise ValueError(f"Chained has no param groups of its own, so a group added to it would never train: add it "
                         f"to the child optimizer that should train it (chained.optimizers: {children}), e.g. "
                         "chained.optimizers[1].add_param_group(group)")

    @property
    def state(self):
        """The children's states, merged for reading (a read-only copy, defaulting to {} as torch's does);
        change them through the children (`update_rules.merge_state.state_owners`)."""
        merged = collections.defaultdict(dict)
        for optimizer in self.optimizers:
            merged.update(optimizer.state)
        return merged

    @state.setter
    def state(self, value) -> None:
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        # A NaN or inf gradient stops the whole step before anything changes: POET checks its own before it turns
        # a weight, and steps first; the others' are checked here (AdamW would write the NaN into its parameters).
        _require_finite([p.grad for o in self.optimizers if not isinstance(o, POET)
                         for g in o.param_groups for p in g["params"] if p.grad is not None])
        for optimizer in sorted(self.optimizers, key=lambda o: not isinstance(o, POET)):
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(f"this state dict holds {len(saved or [])} optimizer(s), this Chained optimizer has "
                             f"{len(self.optimizers)}: it was saved from a different setup")
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(groups: list[dict], betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """torch's AdamW over `groups`, in its fastest form that holds the fewest temporaries (every poetlm
    method's AdamW, and the one beside POET in `poet_optimizer`).

    That is the fused form (one kernel per parameter, no temporaries) for plain float parameters on a CPU
    or a CUDA device: on this project's CPU at llama-60m it takes AdamW's step over the whole model in
    110 ms instead of the loop's 478, and over the embedding and head beside POET in 70 ms instead of
    foreach's 311 (docs/benchmarks.md, "Sixth pass"). Elsewhere (FSDP2's sharded parameters, other
    devices) it is the form with fewer temporaries: on CPUs torch loops over the parameters, and the loop
    still references one parameter's √v̂ while it makes the next one's (up to three times the largest
    parameter); its foreach form makes every √v̂ of a group at once (the group's size). So foreach is
    taken where no group is larger than three of its largest parameter, the loop otherwise.
    """
    params = [p for group in groups for p in group["params"]]
    if params and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() and not is_shard(p) for p in params) \
            and len({p.device for p in params}) == 1:
        return torch.optim.AdamW(groups, betas=betas, fused=True)
    foreach = None
    if params and all(p.device.type == "cpu" for p in params):
        largest = max(p.numel() for p in params)
        foreach = max(sum(p.numel() for p in group["params"]) for group in groups) <= 3 * largest
    return torch.optim.AdamW(groups, betas=betas, foreach=foreach)


def poet_optimizer(model: torch.nn.Module, lr_poet: float = 0.02, lr: float = 3e-3, weight_decay: float = 0.0,
                   poet: POETConfig | None = None, rule: RuleConfig | None = None, betas=(0.9, 0.999),
                   split=None) -> Chained:
    """POET for `model`'s block linears (redrawn as W0 unless poet.init == "keep"), AdamW for the rest.

    Frozen weights stay as they are, in neither optimizer. The output head is never rotated: a plain
    PyTorch model whose head has no telling name (lm_head, output, classifier, score), no
    `get_output_embeddings()` and no tie to an embedding has its last nn.Linear taken as the head.

    The one-call form of the default method: plain nn.Linear layers stay in the model, so any training
    loop (Trainer, accelerate, a hand-written one) can use POET by swapping its optimizer for this one.
    `split`: as for `POET`, to spread the rotations over the processes of a data-parallel job.
    """
    from .model import param_groups, rotated_weights, transposed_names

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"poet_optimizer takes the model (a torch.nn.Module), not a {type(model).__name__}: it finds the "
                        "block linears itself; for a list of weights use poetlm.POET(weights) (and AdamW for the rest)")
    poet = poet or POETConfig()
    named = rotated_weights(model, poet, whole_model=True)
    rotated = {id(weight) for _, weight in named}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in rotated]}
              for g in param_groups(model, lr_base=lr, lr_poet=lr, weight_decay=weight_decay)]
    rest = [g for g in groups if g["params"]]
    optimizers = [POET(named, lr=lr_poet, poet=poet, rule=rule, split=split, transposed=transposed_names(model, named))]
    if rest:
        optimizers.append(adamw(rest, betas=betas))
    return Chained(optimizers)
