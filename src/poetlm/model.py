"""Model-level POET operations: wrap, merge, export, optimizer groups, one weight build per step."""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Iterator

import torch
from torch import nn

from .config import POETConfig
from .layer import POETLinear
from .update_rules import MergeRule, ResetState


def poet_layers(model: nn.Module) -> Iterator[tuple[str, POETLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, POETLinear):
            yield name, module


def rotation_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in poet_layers(model) for p in layer.rotation_parameters()]


def _output_head_names(model: nn.Module) -> set[str]:
    """Linears that produce logits or share their weight with an embedding: never wrapped by default."""
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] in ("lm_head", "output", "classifier", "score")}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is head or (isinstance(module, nn.Linear) and id(module.weight) in embedding_weights):
            heads.add(name)
    return heads


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_target(name: str, config: POETConfig, heads: set[str]) -> bool:
    if _matches(name, config.exclude_modules):
        return False
    targets = config.target_modules
    if targets is None:
        return name not in heads
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return _matches(name, targets)


def poetize(model: nn.Module, config: POETConfig | None = None) -> nn.Module:
    """Replace the targeted nn.Linear layers of `model` (in place) by POETLinear and return the model.

    Their weights become the fixed W0 buffers, the rotation parameters are trainable, and every other
    parameter (biases of the wrapped layers included) keeps its values and requires_grad.
    """
    config = config or POETConfig()
    wrapped = [name for name, _ in poet_layers(model)]
    if wrapped:  # wrapping again would find only the head, which is never wrapped, and blame target_modules
        raise ValueError(f"the model is already poetized ({len(wrapped)} POETLinear layers, e.g. {wrapped[0]!r}); poetize a "
                         "model once, and to change its POET settings poetize a fresh copy of the original model")
    heads = _output_head_names(model)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and _is_target(name, config, heads)]
    if not targets:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = f"its nn.Linear layers are {linears[:8]}" if linears else "it has no nn.Linear layers"
        other = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("Conv1D",)})
        if other:
            hint += f"; it uses {other} layers, which POET does not wrap (convert them to nn.Linear first)"
        raise ValueError(f"poetize found no layer to wrap with target_modules={config.target_modules!r}: {hint}")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, POETLinear.from_linear(linear, config, name))
    return model


def merge(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, rule: MergeRule | None = None) -> int:
    """Merge every POET layer (fold rotations into W0, reset, redraw); returns how many were merged.

    With an optimizer, `rule` (default: reset, the paper's choice) decides what becomes of the
    rotation parameters' optimizer state; the state of other parameters is left alone.
    """
    layers = [layer for _, layer in poet_layers(model)]
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for layer in layers for p in layer.rotation_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold {len(missing)} of the model's rotation parameters, so it never "
                             "trains them (was it created before poetize?); create it after poetize, e.g. "
                             "torch.optim.AdamW(poetlm.param_groups(model, lr_base=..., lr_poet=..., weight_decay=...))")
    for layer in layers:
        layer.merge()
    if optimizer is not None:
        (rule or ResetState()).after_merge(optimizer, [p for layer in layers for p in layer.rotation_parameters()])
    return len(layers)


def export_dense(model: nn.Module) -> nn.Module:
    """A copy of `model` whose POET layers are plain nn.Linear holding the effective weights."""
    dense = copy.deepcopy(model)
    for name, layer in list(poet_layers(dense)):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight0.device, dtype=layer.weight_dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.effective_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent_name) if parent_name else dense, child, linear)
    return dense


def param_groups(model: nn.Module, lr_base: float, lr_poet: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: rotations (lr_poet, no decay), other matrices (lr_base, decay), 1-D params (no decay)."""
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
    try:
        with torch.no_grad():
            for layer in layers:
                trainable = any(p.requires_grad for p in layer.rotation_parameters())
                layer.step_weight = layer.effective_weight().requires_grad_(trainable)
        yield
        for layer in layers:
            grad = layer.step_weight.grad
            layer.step_weight = None  # free the leaf and its gradient before the next layer's build
            if grad is not None:
                layer.effective_weight().backward(grad)
    finally:
        for layer in layers:
            layer.step_weight = None
