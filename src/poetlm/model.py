"""Model-level POET operations: wrap, merge, export, optimizer groups, one weight build per step."""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .config import POETConfig, POETWarning, checked, is_number
from .layer import POETLinear, draw_weight, is_conv1d, wrap_module
from .orthogonal import orthogonal_map, singular_values
from .primitives import batch_entries, plain_name
from .update_rules import MergeRule, ResetState


def poet_layers(model: nn.Module) -> Iterator[tuple[str, POETLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, POETLinear):
            yield name, module


def rotation_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in poet_layers(model) for p in layer.rotation_parameters()]


def _linear_like(module: nn.Module) -> bool:
    """What POET wraps: nn.Linear and transformers' Conv1D (GPT-2)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_head_names(model: nn.Module, whole_model: bool = False) -> set[str]:
    """Linears that produce logits or share their weight with an embedding: never wrapped by default.

    Told by name (lm_head, output, classifier, score), by `get_output_embeddings()` (Hugging Face models)
    or by a tie to an embedding. With `whole_model` (`poet_optimizer`: the model is trained whole), a model
    that shows none of these has its last linear in module order, its output layer, as the head; a module
    given to `poetize` may be a part of a model (a block, a lone linear), whose last linear is no head.
    """
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] in ("lm_head", "output", "classifier", "score")}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is head or (_linear_like(module) and id(module.weight) in embedding_weights):
            heads.add(name)
    linears = [name for name, module in model.named_modules() if _linear_like(module)]
    if whole_model and not heads and len(linears) > 1:
        heads.add(linears[-1])
    return heads


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _within(name: str, patterns: list[str]) -> bool:
    """Whether the module `name` or one that contains it matches (["mlp"]: every linear of every MLP)."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def _is_target(name: str, config: POETConfig, heads: set[str]) -> bool:
    if _within(name, config.exclude_modules):
        return False
    targets = config.target_modules
    if targets is None:
        return name not in heads
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return _matches(name, targets) or (name not in heads and _within(name, targets))  # a head only by its own name


def _refuse_unmatched(model: nn.Module, setting: str, entries: list[str]) -> None:
    """An entry that matches nothing is a typo, which would silently wrap (or leave dense) other layers than meant."""
    # Entries name modules, or weights that are not modules' (in_proj_weight): to target or acknowledge them as dense.
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    for pattern in entries:
        if any(_matches(name, [pattern]) for name in names):
            continue
        candidates = sorted({part for name in names for part in (name, name.rsplit(".", 1)[-1]) if part})
        close = difflib.get_close_matches(pattern, candidates, n=3)
        example = next((name for name, m in model.named_modules() if _linear_like(m)), names[-1])
        examples = " or ".join(map(repr, dict.fromkeys((example, example.rsplit(".", 1)[-1]))))
        hint = (f"did you mean {' or '.join(map(repr, close))}?" if close else
                f"use a module's name or the end of one, e.g. {examples}")
        raise ValueError(f"{setting} entry {pattern!r} matches no module of the model: {hint}")


def poetize(model: nn.Module, config: POETConfig | None = None, *, strict: bool = False, prefix: str = "") -> nn.Module:
    """Replace the targeted nn.Linear / Conv1D layers of `model` (in place) by POET layers; returns the model.

    Each gets a fixed W0 (a frozen parameter): drawn afresh by `config.init` (the default: pretraining, the
    layers' current weights are discarded), or their current weights with init="keep" (finetuning; what
    `get_poet_model` does). The rotation parameters are trainable, and every other parameter (biases of the
    wrapped layers included) keeps its values and requires_grad.

    Targeted weights that are not nn.Linear or Conv1D modules (e.g. Mixtral's fused 3-D expert weights,
    nn.MultiheadAttention's in_proj_weight) stay dense: a warning names them, `strict=True` refuses before
    anything is wrapped, and `poetlm.coverage(model)` reports what is wrapped and what is not.

    Every layer draws its W0 and coordinates from (config.seed, its name). Wrapping parts of a model one
    call at a time, pass each part's name in the whole model as `prefix` (e.g. "model.layers.3"): without
    it the layers of every part are named alike and draw alike.
    """
    config = config or POETConfig()
    refuse_poetized(model)
    targets = target_linears(model, config)
    _refuse_shared_weights(model, targets)
    _check_coverage(model, config, strict)
    for name, module in targets:
        model = replace_module(model, name, wrap_module(module, config, ".".join(filter(None, (prefix, name)))))
    return model


def _warn_of_shared_draws(layers: list[POETLinear]) -> None:
    """Two layers of one model seeded alike draw the same W0 and coordinates: parts poetized one at a time."""
    seen: dict[tuple[int, str], POETLinear] = {}
    for layer in layers:
        other = seen.setdefault((layer.config.seed, layer.seed_key), layer)
        if other is not layer:
            warnings.warn(f"POET layers of one model draw the same W0 and coordinates (both seeded by {layer.seed_key!r}): "
                          "parts of the model were poetized one call at a time without their names; pass each part's "
                          "name as poetize(part, config, prefix='model.layers.3'), or poetize the whole model once",
                          POETWarning, stacklevel=3)
            return


def refuse_poetized(model: nn.Module) -> None:
    """Refuse a model that has POET layers: wrapping again would find only the head, which is never wrapped,
    and blame target_modules."""
    wrapped = [name for name, _ in poet_layers(model)]
    if wrapped:
        raise ValueError(f"the model is already poetized ({len(wrapped)} POETLinear layers, e.g. {wrapped[0]!r}); poetize a "
                         "model once, and to change its POET settings poetize a fresh copy of the original model")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` wherever the module called `name` sits (a module registered under several names stays one
    shared module); returns the model, or `new` itself when `name` is empty (the model itself is replaced)."""
    if not name:
        return new
    old = model.get_submodule(name)
    for module in list(model.modules()):  # each parent once, whatever names it is reached by
        for child_name, child in list(module._modules.items()):  # named_children() yields a module once per parent
            if child is old:
                setattr(module, child_name, new)
    return model


def _refuse_shared_weights(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """POET layers own their W0: a wrapped module sharing its weight with another module (wrapped or not, e.g.
    a head tied to the embedding) would silently stop sharing it."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}  # a module registered under several names holds once
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((".".join(filter(None, (module_name, param_name))), module))
    wrapped = {f"{name}.weight": name for name, _ in targets}
    for name, module in targets:
        others = [holder for holder, owner in holders.get(id(module.weight), []) if owner is not module]
        if not others:
            continue
        if others[0] in wrapped:
            raise ValueError(f"layers {name!r} and {wrapped[others[0]]!r} share one weight, which POET layers would untie "
                             f"(each its own W0 and rotations): exclude one of them (exclude_modules=[{wrapped[others[0]]!r}]), or train "
                             "the model with the POET optimizer (poetlm.optim.poet_optimizer), which rotates a shared weight once")
        raise ValueError(f"layer {name!r} shares its weight with {others[0]!r} (tied), which wrapping it would untie: "
                         f"exclude it (exclude_modules=[{name!r}]), or untie the two before poetize (for a transformers "
                         "model: tie_word_embeddings=False in its config)")


def _check_coverage(model: nn.Module, config: POETConfig, strict: bool) -> None:
    """Warn about (strict: refuse) targeted weights POET cannot take: they are not nn.Linear / Conv1D modules."""
    left_dense = [w for w in coverage(model, config).dense if w.targeted]
    if not left_dense:
        return
    listing = "; ".join(str(w) for w in left_dense[:6]) + (f"; … ({len(left_dense)} in all)" if len(left_dense) > 6 else "")
    message = (f"{len(left_dense)} targeted weight(s) are not nn.Linear or Conv1D modules and stay dense: {listing}. "
               "Add them to exclude_modules (or narrow target_modules) to train only the wrapped layers")
    if strict:
        raise ValueError(f"poetize(strict=True) refuses: {message}; poetlm.coverage(model) lists every weight")
    warnings.warn(message + " (poetize(..., strict=True) refuses instead)", POETWarning, stacklevel=3)


def target_linears(model: nn.Module, config: POETConfig, whole_model: bool = False) -> list[tuple[str, nn.Module]]:
    """The nn.Linear / Conv1D layers POET trains under `config` (target_modules / exclude_modules, never the
    head; `whole_model`: see `_output_head_names`)."""
    checked(config, POETConfig)
    _refuse_unmatched(model, "exclude_modules", config.exclude_modules)
    if isinstance(config.target_modules, list):
        _refuse_unmatched(model, "target_modules", config.target_modules)
    heads = _output_head_names(model, whole_model)
    targets = [(name, module) for name, module in model.named_modules()
               if _linear_like(module) and _is_target(name, config, heads)]
    if not targets:
        linears = [name for name, m in model.named_modules() if _linear_like(m)]
        hint = f"its nn.Linear / Conv1D layers are {linears[:8]}" if linears else "it has no nn.Linear or Conv1D layers"
        excluded = f" and exclude_modules={config.exclude_modules!r}" if config.exclude_modules else ""
        if isinstance(config.target_modules, str):
            hint += " (a target_modules string is a regular expression that must match a layer's whole name, e.g. '.*(q_proj|v_proj)')"
        raise ValueError(f"POET found no layer to wrap with target_modules={config.target_modules!r}{excluded}: {hint}")
    return targets


@torch.no_grad()
def rotated_weights(model: nn.Module, config: POETConfig | None = None,
                    whole_model: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of what `poetlm.optim.POET` should rotate, each redrawn as W0 (unless init == "keep").

    The fold-every-step form of POET: the model keeps plain nn.Linear layers, their weights start as the
    fixed-spectrum W0 the layer form would draw (same seed, same names), and the optimizer only rotates them.
    Frozen weights (requires_grad=False) are left as they are. `whole_model`: see `_output_head_names`.
    """
    config = config or POETConfig()
    weights = []
    targets = target_linears(model, config, whole_model)
    _check_coverage(model, config, strict=False)
    seen = set()
    for name, linear in targets:
        if id(linear.weight) in seen or not linear.weight.requires_grad:  # a shared weight turns once, by the summed gradient
            continue
        seen.add(id(linear.weight))
        if config.init != "keep":
            if is_conv1d(linear):  # weight stored as (in, out)
                drawn = draw_weight(config, *reversed(linear.weight.shape), plain_name(name)).t()
            else:
                drawn = draw_weight(config, linear.out_features, linear.in_features, plain_name(name))
            _refuse_discarding_rotations(name, linear.weight, drawn)
            linear.weight.copy_(drawn)
        weights.append((f"{name}.weight", linear.weight))
    if not weights:
        raise ValueError(f"every layer POET would rotate is frozen ({', '.join(name for name, _ in targets[:4])}"
                         f"{', …' if len(targets) > 4 else ''}): unfreeze them (requires_grad_(True)) or train the model without POET")
    return weights


def _refuse_discarding_rotations(name: str, weight: torch.Tensor, drawn: torch.Tensor) -> None:
    """Refuse to redraw a weight that is this very W0 already rotated (trained by POET, then loaded into the
    model before its optimizer was built): the redraw would silently put back the untrained W0. A rotation
    keeps the Frobenius norm, so only a weight of W0's norm needs the spectra compared."""
    weight, drawn = weight.detach().float(), drawn.to(weight.device, torch.float32)
    if torch.equal(weight, drawn) or not math.isclose(float(weight.norm()), float(drawn.norm()), rel_tol=1e-4):
        return
    sigma, sigma0 = singular_values(weight), singular_values(drawn)
    if float((sigma - sigma0).abs().max()) <= 1e-4 * float(sigma0.max()):
        raise ValueError(f"{name}.weight has the singular values of the W0 POET would draw for it, rotated: it was trained "
                         "with POET, and building the optimizer now would redraw W0 and discard that training. To resume, "
                         "build the optimizer with poet=POETConfig(..., init='keep'), or build it before loading the "
                         "trained weights (then load the optimizer's state)")


def transposed_names(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[str]:
    """The names among `named` (`rotated_weights`'s) of weights stored as (in, out), Conv1D's: `POET(transposed=)`."""
    return [name for name, _ in named if is_conv1d(model.get_submodule(name.removesuffix(".weight")))]


def merge(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, rule: MergeRule | None = None, *,
          gather: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> int:
    """Merge every POET layer (fold rotations into W0, reset, redraw); returns how many were merged.

    With an optimizer, `rule` (default: reset, the paper's choice) decides what becomes of the
    rotation parameters' optimizer state; the state of other parameters is left alone. A module of
    `model` whose class defines `poet_before_merge()` is called first (a POETModel records its merge
    history there). Sharded models (FSDP2): `gather(layer)` is a context manager within which the layer's
    parameters are whole (e.g. `poetlm.train.parallel.full_parameters`); layers are gathered one at a
    time, so a merge never holds more than one whole layer.
    """
    layers = [layer for _, layer in poet_layers(model)]
    _warn_of_shared_draws(layers)
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for layer in layers for p in layer.rotation_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold {len(missing)} of the model's rotation parameters, so it never "
                             "trains them (was it created before poetize?); create it after poetize, e.g. "
                             "torch.optim.AdamW(poetlm.param_groups(model, lr_base=..., lr_poet=..., weight_decay=...))")
    if gather is None:  # refused before the hooks below record a merge that would not happen
        for layer in layers:
            layer.require_whole("poetlm.merge")
            layer.require_finite_rotations()
    for module in model.modules():
        hook = getattr(type(module), "poet_before_merge", None)
        if hook is not None:
            hook(module)
    departures = {}
    for layer in layers:
        with (gather or contextlib.nullcontext)(layer):
            if gather is not None:  # a sharded layer is whole only here
                layer.require_finite_rotations()
            departures[layer.name] = layer.merge()
    worst = max(departures, key=departures.get, default=None)
    if worst is not None and departures[worst] > MERGE_DEPARTURE_WARNING:
        bent = sum(value > MERGE_DEPARTURE_WARNING for value in departures.values())
        warnings.warn(f"poetlm.merge: {bent} layer(s) folded rotations that were not orthogonal (worst {worst!r}: "
                      f"|RᵀR − I| up to {departures[worst]:.1e}), so the merge changed their singular values by about "
                      "that much: the Cayley–Neumann series was used past its radius (‖Q‖₂ near 1 or above). Lower the "
                      "rotations' lr, merge more often, or use parameterization='cayley' (exact)", POETWarning, stacklevel=2)
    if optimizer is not None:
        (rule or ResetState()).after_merge(optimizer, [p for layer in layers for p in layer.rotation_parameters()])
    return len(layers)


# |RᵀR − I| at one merge from which its change of the singular values is worth a warning: 1%. (The paper's recipe,
# CNP k=3 at its best lr, stays near 1e-3 a merge: 2.9e-2 over 20 merges, docs/benchmarks.md.)
MERGE_DEPARTURE_WARNING = 1e-2


def export_dense(model: nn.Module) -> nn.Module:
    """A copy of `model` whose POET layers are plain nn.Linear (Conv1D) modules holding the effective weights."""
    return unpoetize(copy.deepcopy(model))


def unpoetize(model: nn.Module) -> nn.Module:
    """Replace every POET layer of `model` in place by the plain module it computes; returns the model."""
    for name, layer in list(poet_layers(model)):
        model = replace_module(model, name, layer.to_dense())
    return model


@dataclass
class DenseWeight:
    """A matrix (or higher-dimensional) weight that poetize left dense, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str
    targeted: bool  # the config asks for it, but it is not an nn.Linear / Conv1D module

    def __str__(self) -> str:
        return f"{self.name} {list(self.shape)} ({self.reason})"


@dataclass
class Coverage:
    wrapped: list[str]        # POET layers (module names)
    dense: list[DenseWeight]  # every other weight of two or more dimensions
    wrapped_params: int       # entries of the wrapped weights (W0)
    dense_params: int

    def __str__(self) -> str:
        total = self.wrapped_params + self.dense_params
        lines = [f"POET wraps {len(self.wrapped)} layers: {self.wrapped_params:,} of {total:,} matrix weight entries "
                 f"({100 * self.wrapped_params / max(total, 1):.1f}%)"]
        lines += [f"  dense: {w}" for w in self.dense]
        return "\n".join(lines)


def coverage(model: nn.Module, config: POETConfig | None = None) -> Coverage:
    """Which weights POET wraps in `model` and which stay dense (embeddings, the head, excluded or
    unwrappable modules such as fused 3-D expert weights). `config` defaults to the POET layers' own."""
    layers = dict(poet_layers(model))
    if config is None:
        config = next(iter(layers.values())).config if layers else POETConfig()
    heads = _output_head_names(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    wrapped_params = sum(layer.weight0.numel() for layer in layers.values())
    dense, seen = [], set()
    for owner_name, owner in model.named_modules():
        if isinstance(owner, POETLinear):
            continue
        for param_name, param in owner.named_parameters(prefix=owner_name, recurse=False):
            if param.dim() < 2 or id(param) in seen:  # a tied weight (head = embedding) is listed once
                continue
            seen.add(id(param))
            targeted = False
            if id(param) in embeddings:
                reason = "embedding"
            elif owner_name in heads:
                reason = "output head"
            elif _matches(owner_name, config.exclude_modules) or _matches(param_name, config.exclude_modules):
                reason = "exclude_modules"
            elif not (_is_target(owner_name, config, heads) or _is_target(param_name, config, heads)):
                reason = "not in target_modules"
            elif _linear_like(owner):
                reason = "targeted, not wrapped"
            else:
                targeted = True
                kind = "fused expert weights" if param.dim() == 3 else f"a raw {param.dim()}-D parameter"
                reason = f"{kind} of {type(owner).__name__}, not an nn.Linear / Conv1D module"
            dense.append(DenseWeight(param_name, tuple(param.shape), reason, targeted))
    return Coverage(list(layers), dense, wrapped_params, sum(math.prod(w.shape) for w in dense))


def param_groups(model: nn.Module, lr_base: float, lr_poet: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: rotations (lr_poet, no decay), other matrices (lr_base, decay), 1-D params (no decay)."""
    # Checked here: an optimizer takes a negative lr and trains backwards, and fails on a string deep in its step.
    for name, value in (("lr_base", lr_base), ("lr_poet", lr_poet), ("weight_decay", weight_decay)):
        decay = name == "weight_decay"
        if not (is_number(value) and math.isfinite(value) and (value >= 0 if decay else value > 0)):
            rule = "a finite number >= 0 (e.g. 0.1)" if decay else "a finite number > 0 (e.g. 1e-3)"
            raise ValueError(f"param_groups: {name}={value!r} is invalid: must be {rule}")
    rotation_ids = {id(p) for p in rotation_parameters(model)}
    rotations, decayed, plain = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in rotation_ids:
            rotations.append(param)
        elif param.dim() >= 2:
            decayed.append(param)
        else:
            plain.append(param)
    groups = [
        {"name": "poet", "params": rotations, "lr": lr_poet, "weight_decay": 0.0},
        {"name": "base", "params": decayed, "lr": lr_base, "weight_decay": weight_decay},
        {"name": "base_no_decay", "params": plain, "lr": lr_base, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def step_weight_cache(model: nn.Module):
    """Build every effective weight once for a whole optimizer step (all micro-batches).

    Inside the block, POET layers use their effective weight as a leaf tensor, so the micro-batch
    backward passes only accumulate ∂loss/∂W. On exit, each layer's weight is rebuilt with autograd and
    back-propagated into its rotation parameters, one layer at a time. The rotation cost is paid once per
    step, not per micro-batch, and no build graph is held while the micro-batches run (that graph is
    several times the size of the weights).
    """
    layers = [layer for _, layer in poet_layers(model)]
    if any(layer.step_weight is not None for layer in layers):  # the inner block would drop the outer one's gradients
        raise RuntimeError("step_weight_cache is already active for this model: use one block per optimizer step, "
                           "around all of its micro-batches (nested blocks would lose the outer block's gradients)")
    rotations = {id(p) for layer in layers for p in layer.rotation_parameters()}

    def refuse_step_inside(optimizer, args, kwargs):
        if any(id(p) in rotations for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError("optimizer.step() inside step_weight_cache: the rotations' gradients arrive only when the "
                               "block exits, so this step would miss them; call optimizer.step() after the `with` block")

    hook = register_optimizer_step_pre_hook(refuse_step_inside)
    try:
        with torch.no_grad():
            for chunk in _layer_chunks(layers):
                for layer, blocks in zip(chunk, _rotation_blocks(chunk)):
                    trainable = any(p.requires_grad for p in layer.rotation_parameters())
                    # Held in W0's precision whatever the build's: micro-batch gradients accumulate into it.
                    # Contiguous (the build gives a transpose): each micro-batch's ∂loss/∂W then accumulates
                    # as it comes, without a transposing copy into the leaf's layout.
                    weight = layer.effective_weight(blocks, dtype=layer.build_dtype).to(layer.weight0.dtype).contiguous()
                    layer.step_weight = weight.requires_grad_(trainable)
        yield
        with contextlib.ExitStack() as full_precision:  # the rotations' backward in fp32 even if exited inside autocast
            for device_type in {layer.weight0.device.type for layer in layers}:
                full_precision.enter_context(torch.autocast(device_type, enabled=False))
            _backpropagate_step_weights(layers)
    finally:
        hook.remove()
        for layer in layers:
            layer.step_weight = None


def _backpropagate_step_weights(layers: list[POETLinear]) -> None:
    """∂loss/∂W accumulated in each layer's step weight, back-propagated into its rotation parameters."""
    for chunk in _layer_chunks(layers):
        grads = [layer.step_weight.grad for layer in chunk]
        if all(grad is None for grad in grads):
            continue
        mapped, upstream = [], []
        for layer, blocks, grad in zip(chunk, _rotation_blocks(chunk), grads):  # one map, graph kept
            layer.step_weight = None  # free the leaf and its gradient before the next layer's build
            if grad is None:
                continue
            # Each layer's rotations back-propagated by themselves into detached blocks, then the
            # chunk's map once from all of them.
            leaves = tuple(b.detach().requires_grad_(b.requires_grad) for b in blocks)
            weight = layer.effective_weight(leaves, dtype=layer.build_dtype)
            weight.backward(grad.to(weight.dtype))
            for block, leaf in zip(blocks, leaves):
                if leaf.grad is not None:
                    mapped.append(block)
                    upstream.append(leaf.grad)
        if mapped:
            torch.autograd.backward(mapped, upstream)


def _layer_chunks(layers: list[POETLinear]) -> list[list[POETLinear]]:
    """Consecutive layers whose rotation blocks fit one batch (`primitives.batch_entries`): on CPU as many
    as one weight's entries hold (one layer at large b), on a GPU many more, where the maps of separate
    layers would be launches more than work."""
    chunks: list[list[POETLinear]] = []
    entries = 0
    for layer in layers:
        size = sum(side.n_blocks * side.block**2 for side in (layer.rotation_in, layer.rotation_out))
        if not chunks or entries + size > batch_entries(layer.weight0):
            chunks.append([])
            entries = 0
        chunks[-1].append(layer)
        entries += size
    return chunks


def _rotation_blocks(layers: list[POETLinear]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (input-side, output-side) rotation blocks, as `POETLinear.rotation_blocks()` gives them,
    with one map per slot size and map settings over all the layers' sides (fp32, autocast off)."""
    sides = [(layer, side) for layer in layers for side in (layer.rotation_in, layer.rotation_out)]
    groups: dict[tuple, list[int]] = {}
    for i, (layer, side) in enumerate(sides):
        cfg = layer.config
        groups.setdefault((side.block, cfg.parameterization, cfg.neumann_terms, side.skew.dtype, side.skew.device), []).append(i)
    blocks: list[torch.Tensor | None] = [None] * len(sides)
    for (_, parameterization, terms, _, device), members in groups.items():
        with torch.autocast(device.type, enabled=False):
            q = torch.cat([sides[i][1].skew_blocks() for i in members])
            mapped = orthogonal_map(q, parameterization, terms).split([sides[i][1].n_blocks for i in members])
        for i, block in zip(members, mapped):
            blocks[i] = block
    return list(zip(blocks[0::2], blocks[1::2]))
