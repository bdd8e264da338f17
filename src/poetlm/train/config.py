"""Training configuration: dataclasses, TOML presets, command-line overrides, validation.

Resolution order: preset (or --config file) < explicit `section.key=value` overrides. The resolved
config is saved as config.json in the run directory and is all that is needed to rebuild the run.
Each field's trailing comment is its one-line description: `poetlm config` lists them (config_text.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..config import POETConfig
from ..update_rules import RuleConfig

METHODS = ("poet", "poet-paper", "adamw", "muon", "lora")


PAPER_NEUMANN_TERMS = 3  # the paper's CNP k; drifts the spectrum by ~‖Q‖⁴ per merge (POETConfig explains)


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message names it and what is allowed."""


@dataclass
class ModelConfig:
    hidden_size: int = 128           # width of the residual stream
    intermediate_size: int = 384     # width of each block's MLP
    num_layers: int = 4              # decoder blocks
    num_heads: int = 4               # attention heads
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); null = num_heads
    rope_theta: float = 10000.0      # base of the rotary position embedding
    tie_embeddings: bool = False     # the output head shares the token embedding's weight
    hf_config: str | None = None     # null = LLaMA; else any HF causal-LM config (config.json or its dir, model type e.g. qwen2, hub id) at the sizes above


@dataclass
class DataConfig:
    data: str = "sotu"               # bundled name, local path, or hf:NAME[:CONFIG]
    tokenizer: str | None = None     # HF tokenizer directory; None trains a byte-level BPE
    vocab_size: int = 4096           # tokens of the BPE trained when data.tokenizer is unset
    seq_len: int = 128               # tokens per training sequence (also the model's context length)
    val_fraction: float = 0.05       # fraction of the documents held out for validation
    max_documents: int | None = None  # read at most this many documents; null = all
    split_seed: int | None = None    # seeds the document-level train/val split; None = the run's seed
    cache_dir: str = "~/.cache/poetlm"  # tokenizers and token caches, shared by runs


    def resolved_split_seed(self, seed: int) -> int:
        """Pin split_seed to compare seeds on one validation set; by default each seed draws its own split."""
        return seed if self.split_seed is None else self.split_seed


@dataclass
class OptimConfig:
    lr: float = 3e-3                  # ordinary parameters (AdamW's lr, Muon's AdamW part)
    lr_poet: float = 1e-3             # POET's rotations: radians per step (poet) or AdamW's lr on Q (poet-paper)
    lr_muon: float | None = None      # Muon's hidden matrices; None = lr
    lr_hidden: float | None = None    # AdamW's block matrices; None = lr (embeddings, norms, head keep lr)
    weight_decay: float = 0.01        # AdamW's decoupled weight decay (never on POET's rotations)
    beta1: float = 0.9                # AdamW's first-moment decay
    beta2: float = 0.999              # AdamW's second-moment decay
    warmup_steps: int = 0             # steps of linear warmup before the cosine decay
    min_lr_ratio: float = 0.01        # the cosine schedule ends at this fraction of every learning rate
    grad_clip: float = 1.0            # clip the global gradient norm to this
    merge_clip_steps: int = 10        # steps after a merge with a tightened clip (0.1× ramping back to 1×)


@dataclass
class FinetuneConfig:
    base_model: str | None = None     # a local model directory or a hub id; set => finetune it instead of building model.*
    train_norms: bool = False         # also train the norm layers (RMSNorm gains; LayerNorm gains and biases) (POET / LoRA)
    train_biases: bool = False        # also train every parameter named *.bias (POET / LoRA)
    lora_rank: int = 8                # LoRA's rank r (method lora)
    lora_alpha: float = 16.0          # LoRA's scale α (the update is scaled by α/r)
    lora_targets: list[str] | str | None = None  # LoRA's modules (names, suffixes or a regex); null = LLaMA's 7 block linears, else peft's default
    allow_other_tokenizer: bool = False  # accept a data.tokenizer with another vocabulary than the base model's own (its ids then mean other tokens)


@dataclass
class LoggingConfig:
    tensorboard: bool = True          # also write TensorBoard event files to RUN/tensorboard
    wandb: bool = False               # also log to Weights & Biases (pip install 'poetlm[wandb]')
    wandb_project: str = "poetlm"     # the W&B project; the W&B run is named after the run
    wandb_mode: str | None = None     # online | offline (no network; upload later with `wandb sync`); null = WANDB_MODE, else online


@dataclass
class TrainConfig:
    name: str = ""                    # run name, the directory under out_dir; empty = PRESET-METHOD
    method: str = "poet"              # poet | poet-paper | adamw | muon | lora (finetuning only)
    seed: int = 0                     # seeds data order, initialization and (unless poet.seed is set) POET's draws
    steps: int = 300                  # optimizer steps of the run
    batch_size: int = 16              # sequences per micro-batch per process
    grad_accum: int = 1               # micro-batches per optimizer step
    eval_every: int = 100             # steps between validation perplexities (and after the last step)
    eval_tokens: int = 65536          # predicted tokens in the fixed validation set
    log_every: int = 10               # steps between metric lines (metrics.jsonl, backends, progress lines)
    diagnostics_every: int = 50       # steps between POET diagnostics (spectrum drift, ‖Q‖, …), on logged steps
    checkpoint_every: int = 100       # steps between checkpoints (and after the last step)
    keep_checkpoints: int = 2         # the newest checkpoints kept; older ones are deleted
    out_dir: str = "runs"             # parent directory of run directories
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # auto (bf16 autocast on capable GPUs, else fp32) | fp32 | bf16
    parallel: str = "ddp"             # ddp | fsdp (only used under torchrun with more than one process)
    progress: bool = True             # progress output: a bar on a terminal, else one plain line per log_every steps
    activation_checkpointing: bool = False  # keep only each decoder block's input, recompute the block in backward (one more forward)
    compile: bool = False             # torch.compile each decoder block (one graph shared by all blocks; the first step compiles)
    model: ModelConfig = field(default_factory=ModelConfig)  # the architecture and its sizes
    data: DataConfig = field(default_factory=DataConfig)  # corpus, tokenizer, sequence length
    optim: OptimConfig = field(default_factory=OptimConfig)  # learning rates, schedule, clipping
    poet: POETConfig = field(default_factory=POETConfig)  # what POET wraps and how it builds rotations
    rule: RuleConfig = field(default_factory=RuleConfig)  # the update rule of method "poet"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # finetuning a pretrained model
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # where metrics go besides metrics.jsonl

    def __post_init__(self) -> None:
        checks = [
            ("name", self.name in ("", Path(self.name).name) and self.name not in (".", ".."),
             "must be a plain directory name (no path separators); choose where runs go with out_dir"),
            ("method", self.method in METHODS, f"choose one of {METHODS}"),
            ("method", self.method != "lora" or self.finetune.base_model is not None, "lora needs finetune.base_model (poetlm finetune --model ...)"),
            ("finetune.lora_rank", self.finetune.lora_rank >= 1, "must be >= 1"),
            ("finetune.lora_targets", _names_or_pattern(self.finetune.lora_targets),
             "a non-empty list of module names, a regex string, or null (the default targets)"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("eval_tokens", self.eval_tokens >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("diagnostics_every", self.diagnostics_every >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
            ("dtype", self.dtype in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
            ("parallel", self.parallel in ("ddp", "fsdp"), "ddp or fsdp"),
            ("model.num_heads", self.model.num_heads >= 1, "must be >= 1"),
            ("model.hidden_size", self.model.num_heads < 1 or self.model.hidden_size % self.model.num_heads == 0,
             f"must be divisible by model.num_heads={self.model.num_heads}"),
            ("model.hidden_size", self.model.hidden_size >= 1, "must be >= 1"),
            ("model.intermediate_size", self.model.intermediate_size >= 1, "must be >= 1"),
            ("model.num_kv_heads", self.model.num_kv_heads is None
             or (self.model.num_kv_heads >= 1 and self.model.num_heads % self.model.num_kv_heads == 0),
             f"must be >= 1 and divide model.num_heads={self.model.num_heads} (or null: as many as model.num_heads)"),
            ("model.num_layers", self.model.num_layers >= 1, "must be >= 1"),
            ("data.vocab_size", self.data.vocab_size >= 260, "must be >= 260 (256 bytes + special tokens)"),
            ("data.seq_len", self.data.seq_len >= 2, "must be >= 2"),
            ("data.val_fraction", 0 < self.data.val_fraction < 1, "must be between 0 and 1"),
            ("optim.lr", _positive_finite(self.optim.lr), "must be a finite number > 0"),
            ("optim.lr_poet", _positive_finite(self.optim.lr_poet), "must be a finite number > 0"),
            ("optim.lr_hidden", self.optim.lr_hidden is None or _positive_finite(self.optim.lr_hidden),
             "must be a finite number > 0 (or null = optim.lr)"),
            ("optim.lr_muon", self.optim.lr_muon is None or _positive_finite(self.optim.lr_muon),
             "must be a finite number > 0 (or null = optim.lr)"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, "must be >= 0"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, "must be >= 0"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("optim.grad_clip", self.optim.grad_clip > 0, "must be > 0"),
            ("optim.merge_clip_steps", self.optim.merge_clip_steps >= 0, "must be >= 0"),
            ("logging.wandb_mode", self.logging.wandb_mode in (None, "online", "offline"), "online, offline or null (WANDB_MODE decides)"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"config value {key}={_get(self, key)!r} is invalid: {allowed}")

    @property
    def finetuning(self) -> bool:
        return self.finetune.base_model is not None

    @property
    def run_name(self) -> str:
        return self.name or self.method

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive_finite(value: float) -> bool:
    return 0 < value < math.inf


def _names_or_pattern(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return bool(value)
    return bool(value) and all(isinstance(v, str) and v for v in value)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_type(key: str, value, annotation):
    """Accept `value` for a field annotated `annotation` (ints where floats are expected are fine)."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = typing.get_args(annotation) if is_union else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
        if typing.get_origin(kind) is list and isinstance(value, list):
            return value
    names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config value {key}={value!r} has the wrong type: expected {names}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top level)'} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known keys in this section: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.")
        elif name == "target_modules" and cls is POETConfig:
            kwargs[name] = value
        else:
            kwargs[name] = _check_type(prefix + name, value, annotation)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # POETConfig's own validation
        raise ConfigError(str(error)) from None


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("poetlm").joinpath("presets").iterdir() if p.name.endswith(".toml"))


def load_toml(path_or_preset: str) -> dict:
    """A preset name (tiny, small, llama-60m, …) or a path to a TOML file."""
    if path_or_preset in preset_names():
        text = resources.files("poetlm").joinpath("presets", f"{path_or_preset}.toml").read_text()
        source = f"preset {path_or_preset!r}"
    else:
        path = Path(path_or_preset)
        if not path.is_file():
            raise ConfigError(f"no preset or config file named {path_or_preset!r}; presets: {preset_names()}")
        text, source = path.read_text(), str(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source} is not valid TOML: {error}") from None


def parse_override(item: str) -> tuple[list[str], object]:
    """`optim.lr=3e-3` -> (["optim", "lr"], 0.003). Values are read as TOML, else kept as strings."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-3)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _deep_update(base: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        base = base.setdefault(key, {})
        if not isinstance(base, dict):
            raise ConfigError(f"override {'.'.join(keys)} goes inside {key!r}, which is not a section")
    base[keys[-1]] = value


def _flatten(table: dict, prefix: tuple = ()) -> list[tuple[list[str], object]]:
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += _flatten(value, prefix + (key,))
        else:
            out.append((list(prefix + (key,)), value))
    return out


def resolve_config(preset: str = "tiny", overrides: list | None = None) -> TrainConfig:
    """Preset (or TOML file) + overrides: "section.key=value" strings or ("section.key", value) pairs, in order.

    A preset's `[methods.NAME]` tables hold settings for one method only (e.g. its tuned learning rate):
    they apply over the preset's top level when that method runs, and explicit overrides apply over them.
    """
    values = load_toml(preset)
    per_method = values.pop("methods", {})
    parsed = [parse_override(item) if isinstance(item, str) else (item[0].split("."), item[1]) for item in overrides or []]
    unknown = sorted(set(per_method) - set(METHODS))
    if unknown:
        raise ConfigError(f"{preset}: [methods.*] tables for unknown method(s) {unknown}; methods are {list(METHODS)}")
    method = next((value for keys, value in reversed(parsed) if keys == ["method"]), values.get("method", TrainConfig.method))
    for keys, value in _flatten(per_method.get(method, {})) + parsed:
        _deep_update(values, keys, value)
    if values.get("method") == "poet-paper":  # the paper's recipe exactly, unless k is asked for explicitly
        values.setdefault("poet", {}).setdefault("neumann_terms", PAPER_NEUMANN_TERMS)
    if not values.get("name"):  # runs/tiny-poet, runs/tiny-adamw, runs/finetune-lora, …
        values["name"] = f"{Path(preset).stem}-{values.get('method', TrainConfig.method)}"
    return _build_train(values)


def config_from_dict(values: dict) -> TrainConfig:
    return _build_train(values)


def _build_train(values: dict) -> TrainConfig:
    """A TrainConfig whose poet.seed, when not given, is the run's seed.

    One `seed` then reproduces a whole run (data, W0, coordinates), and an explicit poet.seed is honoured,
    e.g. to vary W0 and the coordinates with the data order fixed.
    """
    poet, seed = values.get("poet", {}), values.get("seed", TrainConfig.seed)
    if isinstance(poet, dict) and "seed" not in poet and isinstance(seed, int) and not isinstance(seed, bool):
        values = {**values, "poet": {**poet, "seed": seed}}
    return _build(TrainConfig, values)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(path: Path) -> TrainConfig:
    try:
        return config_from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: is {path.parent} a poetlm run directory?") from None
    except NotADirectoryError:
        raise ConfigError(f"{path.parent} is a file: give the run directory (e.g. runs/NAME), not a file in it") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is corrupt ({error}); it is the run's resolved config and cannot be guessed") from None
