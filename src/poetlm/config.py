"""POETConfig: what to wrap and how the rotations are built. Validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

VARIANTS = ("bs", "fs")
PARAMETERIZATIONS = ("cayley_neumann", "cayley", "exp")
INITS = ("normalized_gaussian", "standard", "xavier", "uniform_spectrum", "keep")
FORWARD_MODES = ("auto", "weight", "input")
ORTHOGONALIZERS = ("auto", "exact", "newton_schulz")
BUILD_DTYPES = ("fp32", "bf16")
DIRECTION_DTYPES = ("auto", *BUILD_DTYPES)


class POETWarning(UserWarning):
    """The library's warnings: something will not happen as asked, or may not be what was meant."""


def checked(value, kind: type):
    """`value` if it is a `kind` (a settings dataclass such as POETConfig), else a TypeError saying how to make one."""
    if not isinstance(value, kind):
        raise TypeError(f"expected a poetlm.{kind.__name__}, got {type(value).__name__} "
                        f"(from a dict: {kind.__name__}(**settings))")
    return value


def is_number(value) -> bool:
    """An int or float, not a bool (True would pass as 1 and say nothing of what was meant)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"POETConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class POETConfig:
    """Settings of a POET wrap (immutable: every layer of a model shares one instance).

    variant: "bs" (block-stochastic: random permutation + block-diagonal rotations) or
        "fs" (fully-stochastic: one rotation on a random subset of coordinates per side).
    block_size: block size b for "bs"; a dimension that b does not divide gets a smaller last block.
    fraction: β for "fs"; each side rotates ⌊β·dim⌋ coordinates.
    parameterization: "cayley_neumann" (the paper's CNP), "cayley" (exact, linear solve) or "exp".
    neumann_terms: k, the number of Neumann terms of CNP. Default 4: CNP_k = Cayley·(I − Q^{k+1}), and for
        odd k the real factor I − Q^{k+1} scales singular values by 1 ± ‖Q‖^{k+1} at every merge (k=3 is the
        paper's setting and drifts); for even k that factor is normal with moduli √(1 + θ^{2k+2}) ≈ 1 while
        ‖Q‖₂ < 1. Beyond it (large steps between merges) use parameterization="cayley", which is exact.
    merge_every: optimizer steps between merge-then-reinitialize (used by the training app).
    init: how W0 is drawn; "keep" keeps the wrapped weight (finetuning).
    init_scale: multiplies the drawn W0. POET never changes singular values, so their scale is a
        hyperparameter of the model, not just of the start (1.0 = the paper's unit-norm rows).
    target_modules: None for every nn.Linear except the output head (a module named lm_head, output, classifier
        or score, the model's get_output_embeddings(), or a linear tied to an embedding; `poet_optimizer`, given
        a model with none of these, takes its last nn.Linear); otherwise a list of module names or name suffixes
        (e.g. ["q_proj", "v_proj"]; a parent module, ["mlp"], stands for every linear inside it but the head; an
        entry that matches nothing is refused) or one regular expression string.
    exclude_modules: module names or suffixes never wrapped, with every linear inside them (["mlp"]: all MLP
        linears), in addition to the output head; an entry that matches nothing is refused.
    forward_mode: "auto" picks the cheaper of the weight-centric and input-centric paths per call.
    build_dtype: precision of the two weight-sized rotations that build the effective weight for forward
        passes (once per step under `step_weight_cache`): "fp32" (W0's) or "bf16" (tensor-core speed on
        GPUs; the weight is rounded to bf16, its gradient accumulates in fp32). The rotation blocks are
        always built in fp32, and merges, export, state dicts and diagnostics always run in fp32.
    seed: seeds W0 and every permutation / index subset (with the layer name and merge count).
    """

    variant: str = "bs"
    block_size: int = 256
    fraction: float = 0.5
    parameterization: str = "cayley_neumann"
    neumann_terms: int = 4
    merge_every: int = 200
    init: str = "normalized_gaussian"
    init_scale: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] = field(default_factory=list)
    forward_mode: str = "auto"
    build_dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise _invalid("variant", self.variant, f"choose one of {VARIANTS}")
        if not is_integer(self.block_size) or self.block_size < 2:
            raise _invalid("block_size", self.block_size, "must be an integer >= 2 (e.g. 64, 128, 256)")
        if not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise _invalid("fraction", self.fraction, "must be a number with 0 < fraction <= 1 (e.g. 0.5)")
        if self.parameterization not in PARAMETERIZATIONS:
            raise _invalid("parameterization", self.parameterization, f"choose one of {PARAMETERIZATIONS}")
        if not is_integer(self.neumann_terms) or self.neumann_terms < 1:
            raise _invalid("neumann_terms", self.neumann_terms, "must be an integer >= 1 (k=0 does not converge; default 4)")
        if not is_integer(self.merge_every) or self.merge_every < 1:
            raise _invalid("merge_every", self.merge_every, "must be an integer >= 1 (optimizer steps; paper uses 200-400)")
        if not is_number(self.init_scale) or not 0 < self.init_scale < math.inf:
            raise _invalid("init_scale", self.init_scale, "must be a finite number > 0 (1.0 = unit-norm rows for normalized_gaussian)")
        if self.init not in INITS:
            raise _invalid("init", self.init, f"choose one of {INITS}")
        if self.forward_mode not in FORWARD_MODES:
            raise _invalid("forward_mode", self.forward_mode, f"choose one of {FORWARD_MODES}")
        if self.build_dtype not in BUILD_DTYPES:
            raise _invalid("build_dtype", self.build_dtype, f"choose one of {BUILD_DTYPES}")
        if not is_integer(self.seed):
            raise _invalid("seed", self.seed, "must be an integer")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as error:
                raise _invalid("target_modules", targets, f"not a valid regular expression ({error})") from None
        elif targets is not None:
            if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
                raise _invalid("target_modules", targets, "use None (all linears but the head), a non-empty list of module names, or a regex string")
            object.__setattr__(self, "target_modules", list(targets))  # frozen: normalized once, here
        if not isinstance(self.exclude_modules, (list, tuple)) or not all(isinstance(t, str) for t in self.exclude_modules):
            raise _invalid("exclude_modules", self.exclude_modules, "must be a list of module names")
        object.__setattr__(self, "exclude_modules", list(self.exclude_modules))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "POETConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"POETConfig got unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)
