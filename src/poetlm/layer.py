"""POETLinear: a linear layer whose weight is Pᵀ·W0ᵀ·Rᵀ with W0 fixed and R, P learned rotations.

Orientation: the paper (docs/POET.md §1) writes W_RP = R·W0·P with W0 ∈ R^{in×out}; torch stores weights as
(out, in), so the frozen parameter `weight0` holds W0ᵀ and the effective (out, in) weight is Pᵀ·weight0·Rᵀ.
R rotates the input side (dimension in_features), P the output side. The bias is added after and never rotated.

GPT-2's `Conv1D` (y = x·W + b with W stored as (in, out)) is the same map with the weight transposed:
`POETConv1D` wraps it with the same math and gives `weight`, the state dict and export back in Conv1D's
orientation.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from torch.nn import functional as F

from .config import POETConfig
from .orthogonal import singular_values
from .primitives import RotationSide, make_side, plain_name, require_rotations, rotate_weight, seeded_generator


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds only this process's part of a parameter (a DTensor, e.g. under FSDP2).

    Told by its interface, so the library needs no torch.distributed: sharding is the training app's
    business (poetlm.train.parallel), which hands the library whole tensors.
    """
    return hasattr(tensor, "full_tensor")


def whole_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor, to read (gathering is a collective every rank joins); any
    other tensor as it is. Writing a changed value back to the shards is the training app's business."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def init_weight(init: str, out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh (out, in) fp32 weight drawn by one of the paper's W0 schemes."""
    gaussian = torch.randn(out_features, in_features, generator=generator)
    if init == "normalized_gaussian":  # every output neuron's fan-in vector on the unit sphere
        return gaussian / gaussian.norm(dim=1, keepdim=True)
    if init == "standard":
        return gaussian * 0.02
    if init == "xavier":
        return gaussian * math.sqrt(2.0 / (in_features + out_features))
    if init == "uniform_spectrum":
        u, _, vh = torch.linalg.svd(gaussian * 0.02, full_matrices=False)
        return u @ vh
    raise ValueError(f"init {init!r} draws no weight (use init='keep' through POETLinear.from_linear)")


def draw_weight(config: POETConfig, out_features: int, in_features: int, name: str) -> torch.Tensor:
    """The fresh W0 of layer `name`: config.init scaled by config.init_scale, a pure function of the seed."""
    return init_weight(config.init, out_features, in_features, seeded_generator(config.seed, name, "init")) * config.init_scale


class POETLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: POETConfig | None = None,
                 name: str = "", weight: torch.Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__()
        config = config or POETConfig()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.name = name
        # W0, the probe and every permutation are drawn from (config.seed, this key): a model's layers by
        # their names (poetize; as `plain_name` reads them, so a compiled model's too), a layer built on its
        # own from torch's generator, so that two of them differ and torch.manual_seed reproduces them.
        self.seed_key = plain_name(name) or f"unnamed:{int(torch.randint(2**62, ()))}"
        dtype = dtype or torch.get_default_dtype()
        self.weight_dtype = dtype  # what export_dense gives back
        # W0 stays in fp32 (or wider) whatever the compute dtype, so merges do not erode the spectrum.
        master = torch.float64 if dtype == torch.float64 else torch.float32
        if weight is None:
            weight = draw_weight(config, out_features, in_features, self.seed_key)
        elif weight.shape != (out_features, in_features):
            raise ValueError(f"POETLinear {name!r}: weight of shape {tuple(weight.shape)} does not fit ({out_features}, {in_features})")
        require_rotations(config.variant, (out_features, in_features), config.block_size, config.fraction, f"layer {name!r}")
        # A frozen parameter rather than a buffer so that FSDP2 shards it like any other weight.
        self.weight0 = nn.Parameter(weight.detach().to(device=device, dtype=master).clone(memory_format=torch.contiguous_format),
                                    requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        sides = [make_side(config.variant, dim, config.block_size, config.fraction).to(device=device, dtype=master)
                 for dim in (in_features, out_features)]
        self.rotation_in: RotationSide = sides[0]
        self.rotation_out: RotationSide = sides[1]
        self.register_buffer("merge_count", torch.zeros((), dtype=torch.long, device=device))
        # Vector probe (paper §7): a fixed unit vector v and the accumulated rotation applied to it.
        probe = torch.randn(in_features, generator=seeded_generator(config.seed, self.seed_key, "probe"))
        probe = (probe / probe.norm()).to(device=device, dtype=master)
        self.register_buffer("probe", probe)
        self.register_buffer("probe_rotated", probe.clone())
        # NaN until recorded; filled from the original W0 before the first merge or diagnostic.
        self.register_buffer("initial_spectrum", torch.full((min(in_features, out_features),), math.nan, device=device, dtype=master))
        self.step_weight: torch.Tensor | None = None  # set by model.step_weight_cache
        self._draw()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: POETConfig, name: str) -> "POETLinear":
        """Wrap an existing nn.Linear: keep its bias; W0 is its weight (init="keep") or a fresh draw."""
        return cls._wrap(linear, linear.in_features, linear.out_features, linear.weight, config, name)

    @classmethod
    def _wrap(cls, module: nn.Module, in_features: int, out_features: int, weight: torch.Tensor,
              config: POETConfig, name: str) -> "POETLinear":
        bias = getattr(module, "bias", None)
        layer = cls(in_features, out_features, bias=bias is not None, config=config, name=name,
                    weight=weight if config.init == "keep" else None, device=weight.device, dtype=weight.dtype)
        if bias is not None:
            layer.bias = bias  # the very same Parameter: its state and requires_grad are untouched
        return layer

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight in the layout of the module this layer replaced."""
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, in the compute dtype and the replaced module's layout.

        For code that reads `.weight` directly (nn.MultiheadAttention's out_proj, fused fast paths). It is
        computed, differentiable in the rotations, and not a parameter: parameter counts, optimizers and
        FSDP see only weight0 and the skew parameters. Writing into it changes nothing (it is a new tensor
        each time); setting it is refused.
        """
        weight = self.step_weight if self.step_weight is not None else self.effective_weight()
        return self._oriented(weight.to(self.weight_dtype))

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # nn.Module's own refusal says only that the attribute exists
            raise AttributeError(f"POETLinear {self.name!r}: weight is computed from W0 and the rotations and cannot be set; "
                                 "to change W0 write weight0 (under torch.no_grad()), or edit the weights of the plain "
                                 "model that poetlm.export_dense(model) returns")
        super().__setattr__(name, value)

    @torch.no_grad()
    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Module:
        """A plain module of the replaced kind computing what this layer computes now, or with the (out, in)
        `weight` instead of the effective one (e.g. the base weight, to unload an adapter)."""
        self.require_whole("to_dense()")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight0.device, dtype=self.weight_dtype)
        linear.weight.copy_(self.effective_weight() if weight is None else weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The dense weight under the replaced module's own key: a plain loader (from_pretrained on a
        # directory written by model.save_pretrained or a Trainer checkpoint) then builds the model this
        # layer computes, instead of leaving a random weight. A rank of an FSDP2-sharded layer holds part
        # of W0 only, so it has no dense weight to write; its checkpoints are loaded by poetlm.
        if not is_shard(self.weight0):
            with torch.no_grad():
                destination[prefix + "weight"] = self._oriented(self.effective_weight().to(self.weight_dtype)).contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight" in unexpected_keys:  # derived from W0 and the rotations, which are what gets loaded
            unexpected_keys.remove(prefix + "weight")
            if prefix + "weight0" not in state_dict:  # even with strict=False: the dense weight would be dropped unseen
                error_msgs.append(f"{prefix}weight: a dense weight without POET's W0 and rotations (a plain model's state "
                                  "dict), which a POET layer cannot take; load it into the plain model and poetize that "
                                  "with init='keep' (or poetlm.get_poet_model) to start POET from these weights")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) or .half() casts every floating tensor. W0, the skew parameters and the
        # probe are the fp32 master state of the merges: they follow device moves (and a cast up to fp64)
        # only, while the new dtype becomes the compute dtype, as it would for an nn.Linear.
        masters = [self.weight0, self.probe, self.probe_rotated, self.initial_spectrum, *self.rotation_parameters()]
        master_ids = {id(t) for t in masters} | {id(t.grad) for t in masters if t.grad is not None}

        def keep_master(t: torch.Tensor) -> torch.Tensor:
            applied = fn(t)
            if id(t) in master_ids and applied.is_floating_point():
                wanted = torch.float64 if applied.dtype == torch.float64 else torch.float32
                if applied.dtype != wanted:
                    applied = t.to(device=applied.device, dtype=wanted)
            return applied

        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return super()._apply(keep_master, recurse)

    def extra_repr(self) -> str:
        variant = f"bs b={self.config.block_size}" if self.config.variant == "bs" else f"fs β={self.config.fraction}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {variant}"

    def full_precision(self) -> torch.autocast:
        """A region without autocast on W0's device: rotations, merges and diagnostics keep W0's precision."""
        return torch.autocast(self.weight0.device.type, enabled=False)

    def rotation_parameters(self) -> list[nn.Parameter]:
        return [self.rotation_in.skew, self.rotation_out.skew]

    @torch.no_grad()
    def _draw(self) -> None:
        if self.merge_count.is_meta:  # shapes only (e.g. counting parameters): nothing to draw on
            return
        count = int(self.merge_count)
        for side_name, side in (("in", self.rotation_in), ("out", self.rotation_out)):
            side.redraw(seeded_generator(self.config.seed, self.seed_key, count, side_name))

    def rotation_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (input-side, output-side) rotation blocks, always built in fp32 even under autocast."""
        cfg = self.config
        with self.full_precision():
            return (self.rotation_in.blocks(cfg.parameterization, cfg.neumann_terms),
                    self.rotation_out.blocks(cfg.parameterization, cfg.neumann_terms))

    def effective_weight(self, blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
        """The current (out, in) weight Pᵀ·W0ᵀ·Rᵀ in W0's precision, differentiable in the rotations.

        `blocks` (from `rotation_blocks()`) saves rebuilding them when the caller already has them.
        `dtype` runs the two weight-sized rotations in that precision instead (see `build_dtype`).
        """
        blocks_in, blocks_out = blocks if blocks is not None else self.rotation_blocks()
        weight0 = self.weight0 if dtype is None else self.weight0.to(dtype)
        with self.full_precision():
            return rotate_weight(weight0, self.rotation_in, blocks_in, self.rotation_out, blocks_out)

    @property
    def build_dtype(self) -> torch.dtype | None:
        """The precision of a training step's weight build (config.build_dtype); None = W0's. Merges never use it."""
        return torch.bfloat16 if self.config.build_dtype == "bf16" else None

    def uses_input_centric(self, tokens: int) -> bool:
        """Rotating activations costs tokens·(c_in + c_out); building the weight costs out·c_in + in·c_out."""
        mode = self.config.forward_mode
        if mode != "auto":
            return mode == "input"
        c_in, c_out = self.rotation_in.flops_per_vector, self.rotation_out.flops_per_vector
        return tokens * (c_in + c_out) < self.out_features * c_in + self.in_features * c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the input-centric path would fail deep inside a gather instead
            raise ValueError(f"POETLinear {self.name!r} takes inputs whose last dimension is in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():  # the weight would be cast to the input's dtype: integer zeros, no error
            raise TypeError(f"POETLinear {self.name!r} takes floating-point inputs, got {x.dtype} (token ids go through "
                            "an embedding first; cast other inputs with .float())")
        if self.step_weight is not None:
            return F.linear(x, self.step_weight.to(x.dtype), self._bias_like(x))
        if not self.uses_input_centric(x.numel() // self.in_features):
            return F.linear(x, self.effective_weight(dtype=self.build_dtype).to(x.dtype), self._bias_like(x))
        blocks_in, blocks_out = self.rotation_blocks()
        # Under autocast only the product with W0 runs in low precision, as on the weight path: the
        # activations are rotated in the blocks' precision, and the result takes the product's dtype.
        autocast = torch.is_autocast_enabled(x.device.type)
        with self.full_precision():
            x = self.rotation_in.rotate(x.to(blocks_in.dtype) if autocast else x, blocks_in, transpose=True)  # Rᵀ·x
        h = F.linear(x, self.weight0.to(x.dtype))
        with self.full_precision():
            rotated = self.rotation_out.rotate(h.to(blocks_out.dtype) if autocast else h, blocks_out, transpose=True)  # Pᵀ·h
        h = rotated.to(h.dtype)
        return h if self.bias is None else h + self.bias.to(h.dtype)

    def _bias_like(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    @torch.no_grad()
    def record_initial_spectrum(self) -> None:
        if torch.isnan(self.initial_spectrum).any() and int(self.merge_count) == 0:
            self.initial_spectrum.copy_(singular_values(self.weight0))

    def require_whole(self, operation: str) -> None:
        """Refuse a whole-matrix operation on a sharded layer, where it would compute on one shard only."""
        if any(is_shard(t) for t in (self.weight0, *self.rotation_parameters())):
            raise ValueError(f"POETLinear {self.name!r}: {operation} needs whole matrices, but this process holds a shard "
                             "of the layer (FSDP2); run it where the layer is gathered: pass gather= to poetlm.merge or "
                             "model_diagnostics (e.g. gather=poetlm.train.parallel.full_parameters), or call it inside "
                             "`with full_parameters(layer):`")

    def require_finite_rotations(self) -> None:
        """Refuse to fold NaN or inf rotations into W0, where they would stay: the training has diverged, and
        what W0 holds now is the last state worth keeping."""
        if not all(bool(torch.isfinite(skew).all()) for skew in self.rotation_parameters()):
            raise FloatingPointError(f"POETLinear {self.name!r}: its rotation parameters hold NaN or inf (the training has "
                                     "diverged: lower the learning rate, or check the loss and the data); nothing was "
                                     "merged, so W0 still holds the last finite weights")

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the rotations into W0 (in fp32), reset them to identity and draw new coordinates. Returns how far
        the folded blocks were from orthogonal (max |RᵀR − I|): what the merge moved the singular values by."""
        self.require_whole("merge()")
        self.record_initial_spectrum()
        blocks = self.rotation_blocks()
        departure = max((float((b.mT @ b - torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)).abs().max())
                         for b in blocks if b.numel()), default=0.0)
        with self.full_precision():
            self.probe_rotated.copy_(self.rotation_in.rotate(self.probe_rotated, blocks[0].to(self.probe_rotated.dtype)))
            self.weight0.copy_(self.effective_weight(blocks))
        self.rotation_in.reset()
        self.rotation_out.reset()
        self.merge_count += 1
        self._draw()
        return departure


def is_conv1d(module: nn.Module) -> bool:
    # No module can be a Conv1D before transformers.pytorch_utils is imported, and importing it costs seconds.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


class POETConv1D(POETLinear):
    """POET on transformers' Conv1D (GPT-2 and relatives), whose weight is stored as (in, out).

    W0 holds that weight transposed, so everything else is POETLinear's math; `weight`, the dense entry
    of the state dict and `to_dense()` are in Conv1D's layout, which GPT-2 code and checkpoints expect.
    """

    @classmethod
    def from_conv1d(cls, conv: nn.Module, config: POETConfig, name: str) -> "POETConv1D":
        in_features, out_features = conv.weight.shape
        return cls._wrap(conv, in_features, out_features, conv.weight.t(), config, name)

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    @torch.no_grad()
    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        self.require_whole("to_dense()")
        conv = Conv1D(self.out_features, self.in_features).to(device=self.weight0.device, dtype=self.weight_dtype)
        conv.weight.copy_((self.effective_weight() if weight is None else weight).t())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv


def wrap_module(module: nn.Module, config: POETConfig, name: str) -> POETLinear:
    """The POET layer replacing an nn.Linear or a Conv1D."""
    if is_conv1d(module):
        return POETConv1D.from_conv1d(module, config, name)
    return POETLinear.from_linear(module, config, name)
