"""Training configuration: dataclasses, TOML presets, command-line overrides, validation.

Resolution order: preset (or --config file) < explicit `section.key=value` overrides. The resolved
config is saved as config.json in the run directory and is all that is needed to rebuild the run.
Each field's trailing comment is its one-line description: `poetlm config` lists them (config_text.py).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..config import POETConfig
from ..update_rules import RuleConfig
from . import files

METHODS = ("poet", "poet-paper", "adamw", "muon", "lora")


PAPER_NEUMANN_TERMS = 3  # the paper's CNP k; drifts the spectrum by ~‖Q‖⁴ per merge (POETConfig explains)
PAPER_LR_POET = 1e-3  # AdamW's lr on the skew parameters in the paper's recipe (its LLaMA-60m value)


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
    val_fraction: float = 0.05       # share of the documents held out for validation (of the text, when one document is larger)
    max_documents: int | None = None  # read at most this many documents; null = all
    split_seed: int | None = None    # seeds the document-level train/val split; None = the run's seed
    cache_dir: str = "~/.cache/poetlm"  # tokenizers and token caches, shared by runs


    def resolved_split_seed(self, seed: int) -> int:
        """Pin split_seed to compare seeds on one validation set; by default each seed draws its own split."""
        return seed if self.split_seed is None else self.split_seed


@dataclass
class OptimConfig:
    lr: float = 3e-3                  # ordinary parameters (AdamW's lr, Muon's AdamW part)
    lr_poet: float = 0.02             # POET's rotations: radians per step (poet) or AdamW's lr on Q (poet-paper; unset: 1e-3)
    lr_muon: float | None = None      # Muon's hidden matrices; None = lr
    lr_hidden: float | None = None    # AdamW's block matrices; None = lr (embeddings, norms, head keep lr)
    weight_decay: float = 0.01        # AdamW's decoupled weight decay (never on POET's rotations)
    beta1: float = 0.9                # AdamW's first-moment decay
    beta2: float = 0.999              # AdamW's second-moment decay
    warmup_steps: int = 0             # steps of linear warmup before the cosine decay
    min_lr_ratio: float = 0.01        # the cosine decays toward this fraction of every learning rate (reached one step after the last)
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
    keep_checkpoints: int = 2         # the newest intact checkpoints kept; older and damaged ones are deleted
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
        head_size = self.model.hidden_size // max(self.model.num_heads, 1)
        checks = [
            ("name", self.name in ("", Path(self.name).name) and self.name not in (".", ".."),
             "must be a plain directory name (no path separators); choose where runs go with out_dir"),
            ("method", self.method in METHODS, f"choose one of {METHODS}"),
            ("method", self.method != "lora" or self.finetune.base_model is not None, "lora needs finetune.base_model (poetlm finetune --model ...)"),
            ("finetune.lora_rank", self.finetune.lora_rank >= 1, "must be >= 1"),
            ("finetune.lora_alpha", _positive_finite(self.finetune.lora_alpha), "must be a finite number > 0"),
            ("finetune.lora_targets", _names_or_pattern(self.finetune.lora_targets),
             "a non-empty list of module names, a regex string, or null (the default targets)"),
            ("seed", 0 <= self.seed < 2**64, "must be an integer in [0, 2**64)"),
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
            # RoPE turns pairs of a head's dimensions. Only LLaMA (hf_config null) is known here; another
            # architecture may have no RoPE (GPT-2), and models.py checks it once its config is built.
            ("model.hidden_size", self.model.hf_config is not None or head_size % 2 == 0,
             f"LLaMA's rotary position embedding needs an even head size, not model.hidden_size / model.num_heads = "
             f"{head_size}; e.g. model.hidden_size={self.model.num_heads * (head_size + 1)}"),
            ("model.intermediate_size", self.model.intermediate_size >= 1, "must be >= 1"),
            ("model.num_kv_heads", self.model.num_kv_heads is None
             or (self.model.num_kv_heads >= 1 and self.model.num_heads % self.model.num_kv_heads == 0),
             f"must be >= 1 and divide model.num_heads={self.model.num_heads} (or null: as many as model.num_heads)"),
            ("model.num_layers", self.model.num_layers >= 1, "must be >= 1"),
            ("model.rope_theta", _positive_finite(self.model.rope_theta), "must be a finite number > 0 (default 10000)"),
            ("data.tokenizer", self.data.tokenizer != "", "must name a tokenizer directory or hub id, or be null (train a BPE)"),
            ("data.vocab_size", self.data.vocab_size >= 260, "must be >= 260 (256 bytes + special tokens)"),
            ("data.seq_len", self.data.seq_len >= 2, "must be >= 2"),
            ("data.max_documents", self.data.max_documents is None or self.data.max_documents >= 1,
             "must be >= 1 (or null = every document)"),
            ("data.val_fraction", 0 < self.data.val_fraction < 1, "must be between 0 and 1"),
            ("data.split_seed", self.data.split_seed is None or 0 <= self.data.split_seed < 2**64,
             "must be an integer in [0, 2**64) (or null = the run's seed)"),
            ("optim.lr", _positive_finite(self.optim.lr), "must be a finite number > 0"),
            ("optim.lr_poet", _positive_finite(self.optim.lr_poet), "must be a finite number > 0"),
            ("optim.lr_hidden", self.optim.lr_hidden is None or _positive_finite(self.optim.lr_hidden),
             "must be a finite number > 0 (or null = optim.lr)"),
            ("optim.lr_muon", self.optim.lr_muon is None or _positive_finite(self.optim.lr_muon),
             "must be a finite number > 0 (or null = optim.lr)"),
            ("optim.weight_decay", 0 <= self.optim.weight_decay < math.inf, "must be a finite number >= 0"),
            ("optim.beta1", 0 <= self.optim.beta1 < 1, "must be in [0, 1) (default 0.9)"),
            ("optim.beta2", 0 <= self.optim.beta2 < 1, "must be in [0, 1) (default 0.999)"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, "must be >= 0"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("optim.grad_clip", self.optim.grad_clip > 0, "must be > 0"),
            ("optim.merge_clip_steps", self.optim.merge_clip_steps >= 0, "must be >= 0"),
            ("logging.wandb_mode", self.logging.wandb_mode in (None, "online", "offline"), "online, offline or null (WANDB_MODE decides)"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"config value {key}={config_value(self, key)!r} is invalid: {allowed}")

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


def config_value(obj, dotted: str):
    """The value of a dotted key (optim.lr) of a config."""
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
    raise ConfigError(f"config value {key}={value!r} has the wrong type: expected {names}{_type_hint(key, value, allowed)}")


def _type_hint(key: str, value, allowed: tuple) -> str:
    """How to write the value meant, for the natural mistakes of a KEY=VALUE written by hand ('' if none applies)."""
    if value is None:
        return f" ({key} cannot be null: give a value, or leave it out for its default)"
    if not isinstance(value, str):
        # On the command line an unquoted 123 or true is read as TOML, not as the string it was meant to be.
        return f" (a string goes in quotes: {key}='\"{value}\"')" if str in allowed and not isinstance(value, (dict, list)) else ""
    # An override TOML cannot read is kept as the text typed: say how TOML writes what it looks like.
    if bool in allowed and value.lower() in ("true", "false"):
        return f" (TOML writes booleans lowercase: {key}={value.lower()})"
    if any(typing.get_origin(kind) is list for kind in allowed):
        return f" (write a TOML list, e.g. {key}='[\"{value}\"]')"
    if float in allowed or int in allowed:
        return _number_hint(key, value, allowed)
    return ""


def _number_hint(key: str, text: str, allowed: tuple) -> str:
    """For a number kept as text: one quoted ("12"), or one TOML cannot read (1., .5). The value suggested is
    one the key takes: a whole number for an int key."""
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    if float in allowed:
        why = "a number goes without quotes" if _reads_as_number(text) else "TOML needs a digit on both sides of a decimal point"
        return f" ({why}: {key}={number!r})"
    return f" (an integer is written without quotes or a decimal point: {key}={int(number)})" if number.is_integer() else ""


def _reads_as_number(text: str) -> bool:
    """Whether TOML reads `text` unquoted as a number (then the text came quoted)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_key_names(cls=None, prefix: str = "") -> list[str]:
    """Every full key name of a config dataclass (default TrainConfig): seed, optim.lr, poet.block_size, …"""
    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        names += config_key_names(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name]) else [prefix + f.name]
    return names


def closest_keys(key: str) -> list[str]:
    """The config keys `key` may have meant: those of its name in any section, else the closest spellings."""
    known = config_key_names()
    name = key.rpartition(".")[2]
    return [k for k in known if k.rpartition(".")[2] == name] or difflib.get_close_matches(key, known, n=2, cutoff=0.6)


def _suggestion(key: str, value=None) -> str:
    """' (did you mean optim.warmup_steps?)', or '' when no key is close. An unknown section (`value` a table,
    e.g. train.grad_accum) is matched by the keys in it."""
    close = closest_keys(key)
    if not close and isinstance(value, dict):
        close = list(dict.fromkeys(k for inner in value for k in closest_keys(inner)))
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _known_fields(cls, values, prefix: str) -> dict:
    """The type hints of `cls`, once `values` is a table whose keys are all fields of it."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top level)'} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        named = ", ".join(repr(prefix + k) + _suggestion(prefix + k, values[k]) for k in unknown)
        raise ConfigError(f"unknown config key(s) {named}; known keys in this section: {sorted(fields)}")
    return hints


def _check_keys(cls, values, prefix: str) -> None:
    """Refuse unknown keys of a partial config (a [methods.NAME] table) without building it."""
    hints = _known_fields(cls, values, prefix)
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            _check_keys(hints[name], value, f"{prefix}{name}.")


def _build(cls, values: dict, prefix: str = ""):
    hints = _known_fields(cls, values, prefix)
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
        text = resources.files("poetlm").joinpath("presets", f"{path_or_preset}.toml").read_text(encoding="utf-8")
        source = f"preset {path_or_preset!r}"
    else:
        path = Path(path_or_preset)
        if not path.is_file():
            raise ConfigError(f"no preset or config file named {path_or_preset!r}; presets: {preset_names()}")
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source} is not a TOML file: TOML is UTF-8 text, and byte {error.start} is not UTF-8; "
                              "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source} is not valid TOML: {error}") from None


# How an override unsets a key (as `poetlm config` and --print-config show it; None as Python writes it).
NULL_WORDS = ("null", "None")


def parse_override(item: str) -> tuple[list[str], object]:
    """`optim.lr=3e-3` -> (["optim", "lr"], 0.003). Values are read as TOML, else kept as strings; null is None."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-3)")
    if raw.strip() in NULL_WORDS:  # TOML has no null; the quoted '"null"' is still the string
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def parse_overrides(overrides: list) -> list[tuple[list[str], object]]:
    """"section.key=value" strings or ("section.key", value) pairs as (["section", "key"], value)."""
    return [parse_override(item) if isinstance(item, str) else (item[0].split("."), item[1]) for item in overrides]


def override_config(config: TrainConfig, parsed: list[tuple[list[str], object]]) -> TrainConfig:
    """`config` (a run's saved one: nothing derived) with the parsed overrides set, checked as any config."""
    values = config.to_dict()
    for keys, value in parsed:
        _deep_update(values, keys, value)
    return config_from_dict(values)


def _deep_update(base: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        base = base.setdefault(key, {})
        if not isinstance(base, dict):
            raise ConfigError(f"override {'.'.join(keys)} goes inside {key!r}, which is not a section")
    base[keys[-1]] = value


def _discard(table: dict, keys: list[str]) -> None:
    """Remove the nested key `keys` from `table` if it is there, and the sections it leaves empty."""
    inner = table.get(keys[0])
    if len(keys) > 1 and isinstance(inner, dict):
        _discard(inner, keys[1:])
        if not inner:
            del table[keys[0]]
    elif len(keys) == 1:
        table.pop(keys[0], None)


def _flatten(table: dict, prefix: tuple = ()) -> list[tuple[list[str], object]]:
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += _flatten(value, prefix + (key,))
        else:
            out.append((list(prefix + (key,)), value))
    return out


def _method_tables(values: dict, source: str) -> dict:
    """The file's [methods.NAME] tables (taken out of `values`), every key checked whatever method runs."""
    tables = values.pop("methods", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: methods={tables!r} must be a section of [methods.NAME] tables, NAME one of {list(METHODS)}")
    unknown = sorted(set(tables) - set(METHODS))
    if unknown:
        raise ConfigError(f"{source}: [methods.*] tables for unknown method(s) {unknown}; methods are {list(METHODS)}")
    for name, table in tables.items():
        _check_keys(TrainConfig, table, f"methods.{name}.")
    return tables


def _override(top: dict, tables: dict, keys: list[str], value) -> None:
    """Set a key explicitly: at the top level, and for every method (out of each [methods.NAME] table)."""
    _deep_update(top, keys, value)
    for table in tables.values():
        _discard(table, keys)


def _load_layered(path_or_preset: str, below: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(top level, [methods.NAME] tables) of a preset or TOML file, laid over the preset or file its `base`
    key names (a path relative to the file): its keys then override the base's, for every method as
    explicit overrides do, and its method tables add to the base's."""
    top = load_toml(path_or_preset)
    tables = _method_tables(top, path_or_preset)
    base = top.pop("base", None)
    if base is None:
        return top, tables
    if not isinstance(base, str):
        raise ConfigError(f"{path_or_preset}: base={base!r} must be a preset name ({', '.join(preset_names())}) or "
                          "the path of another TOML file, as a string")
    if base not in preset_names():
        base = str(Path(path_or_preset).parent / base)
    if base in below + (path_or_preset,):
        raise ConfigError(f"{path_or_preset}: base={base!r} leads back to itself ({' -> '.join(below + (path_or_preset, base))})")
    values, base_tables = _load_layered(base, below + (path_or_preset,))
    for keys, value in _flatten(top):
        _override(values, base_tables, keys, value)
    for name, table in tables.items():
        for keys, value in _flatten(table):
            _deep_update(base_tables.setdefault(name, {}), keys, value)
    return values, base_tables


@dataclass
class Resolution:
    """How a resolved config came about, for writing it as a file that keeps derived values derived (to_toml).

    top: the config without any method's own table and without derived values (those of `derived`);
    methods: the [methods.NAME] tables, less the keys set explicitly (an explicit value wins for every method);
    name_prefix: runs are named NAME_PREFIX-METHOD unless `name` is set; explicit: the keys set as overrides.
    """

    top: TrainConfig
    methods: dict
    name_prefix: str
    derived: dict[str, str]  # key -> what it follows
    explicit: list[str]


def resolve_config(preset: str = "tiny", overrides: list | None = None) -> TrainConfig:
    """Preset (or TOML file) + overrides: "section.key=value" strings or ("section.key", value) pairs, in order.

    A preset's `[methods.NAME]` tables hold settings for one method only (e.g. its tuned learning rate):
    they apply over the preset's top level when that method runs, and explicit overrides apply over them.
    The result carries its `Resolution` as `config.resolution`.
    """
    top, tables = _load_layered(preset)
    name_prefix = _check_type("name_prefix", top.pop("name_prefix", Path(preset).stem), str)
    parsed = parse_overrides(overrides or [])
    for keys, value in parsed:
        if list(keys) == ["name_prefix"]:  # a file's key, not a config field: it only names the run
            name_prefix = _check_type("name_prefix", value, str)
            continue
        _override(top, tables, keys, value)
    _check_keys(TrainConfig, top, "")
    method = top.get("method", TrainConfig.method)
    values = copy.deepcopy(top)
    for keys, value in _flatten(tables.get(method, {})):
        _deep_update(values, keys, value)
    derived = {}
    if "neumann_terms" not in values.get("poet", {}):  # a method's default: the paper's recipe exactly, unless k is asked for
        derived["poet.neumann_terms"] = f"unset: {PAPER_NEUMANN_TERMS} with method poet-paper, else {POETConfig.neumann_terms}"
        if method == "poet-paper":
            values.setdefault("poet", {})["neumann_terms"] = PAPER_NEUMANN_TERMS
    if "lr_poet" not in values.get("optim", {}):  # one key, two scales: an angle, or AdamW's lr on Q
        derived["optim.lr_poet"] = f"unset: {PAPER_LR_POET} with method poet-paper, else {OptimConfig.lr_poet}"
        if method == "poet-paper":
            values.setdefault("optim", {})["lr_poet"] = PAPER_LR_POET
    if not values.get("name"):  # runs/tiny-poet, runs/tiny-adamw, runs/finetune-lora, …
        values["name"] = top["name"] = f"{name_prefix}-{method}"
        derived["name"] = "unset: NAME_PREFIX-METHOD"
    if "seed" not in values.get("poet", {}):
        derived["poet.seed"] = "unset: follows seed"
    config = _build_train(values)
    config.resolution = Resolution(_build_train(top), tables, name_prefix, derived, [".".join(keys) for keys, _ in parsed])
    for message in config_warnings(config):
        warnings.warn(message, ConfigWarning, stacklevel=2)
    return config


# Keys that only some methods read (a key, or every key that starts with it), and which; the most specific entry applies.
METHOD_KEYS = {
    "poet.": ("poet", "poet-paper"),
    "poet.merge_every": ("poet-paper",),  # the fold form merges every step
    "poet.forward_mode": ("poet-paper",),
    "poet.build_dtype": ("poet-paper",),
    "optim.merge_clip_steps": ("poet-paper",),
    "optim.lr_poet": ("poet", "poet-paper"),
    "optim.lr_muon": ("muon",),
    "optim.lr_hidden": ("adamw",),
    "rule.": ("poet",),
    "finetune.lora_": ("lora",),
    "finetune.train_norms": ("poet", "poet-paper", "lora"),  # the other methods train every parameter anyway
    "finetune.train_biases": ("poet", "poet-paper", "lora"),
}
FINETUNING_KEYS = ("finetune.",)  # only read when finetuning (finetune.base_model set)
PRETRAINING_KEYS = ("model.",)  # a finetuned model's architecture is the base model's


def methods_using(key: str) -> tuple[str, ...]:
    """The methods that read `key` (all of them for most keys)."""
    matches = [entry for entry in METHOD_KEYS if key == entry or (entry.endswith((".", "_")) and key.startswith(entry))]
    return METHOD_KEYS[max(matches, key=len)] if matches else METHODS


def _unused_because(config: TrainConfig, key: str) -> str | None:
    """Why `config` runs without reading `key`, or None if it reads it."""
    if key.startswith(PRETRAINING_KEYS) and config.finetuning:
        return "finetuning builds no model: the architecture is finetune.base_model's"
    if key.startswith(FINETUNING_KEYS) and key != "finetune.base_model" and not config.finetuning:
        return "finetuning only"
    if key in ("poet.init", "poet.init_scale") and config.finetuning:
        return "a finetune's W0 is the base model's weight"
    if key == "data.vocab_size" and (config.data.tokenizer is not None or config.finetuning):
        return "the vocabulary is the given tokenizer's" if config.data.tokenizer is not None else "the vocabulary is the base model's"
    users = methods_using(key)
    return None if config.method in users else f"method {' / '.join(users)} only"


class ConfigWarning(UserWarning):
    """A setting the run will not honour as asked (it runs anyway)."""


def config_warnings(config: TrainConfig) -> list[str]:
    """Settings a resolved config asks for that its run would silently not honour."""
    found = []
    unused = [f"{key} ({why})" for key in config.resolution.explicit if (why := _unused_because(config, key))]
    if unused:
        found.append(f"{config.method} run ignores {', '.join(unused)}: drop them, or choose what uses them")
    if config.diagnostics_every % config.log_every and config.diagnostics_every < config.steps:
        every = math.lcm(config.diagnostics_every, config.log_every)
        found.append(f"diagnostics_every={config.diagnostics_every} is not a multiple of log_every={config.log_every}: "
                     f"diagnostics are recorded on logged steps, so every {every} steps (and at the last); make it a "
                     "multiple of log_every")
    if config.optim.warmup_steps >= config.steps:  # short smoke runs on a preset do this on purpose: a warning, not an error
        found.append(f"optim.warmup_steps={config.optim.warmup_steps} is not below steps={config.steps}: the learning rate "
                     "never decays (and with more warmup steps never reaches its peak); lower optim.warmup_steps")
    return found


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


def make_dir(path: Path, key: str, error_type: type[Exception] = ConfigError) -> None:
    """Create the directory that config key (or flag) `key` names, with its parents; a path that cannot be one is the
    key's error, of `error_type`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, /proc, no permission, …
        raise error_type(f"{key}={str(path)!r} cannot be made a directory ({error.strerror}: {error.filename}); "
                          f"choose another {key}") from None


def save_config(config: TrainConfig, path: Path) -> None:
    # Atomic: every process of a resumed torchrun job writes the same adjusted config.json, and each then reads it.
    files.write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(path: Path) -> TrainConfig:
    try:
        values = json.loads(path.read_text())
        if isinstance(values, dict) and "model_type" in values:  # a Hugging Face model's config.json
            owner = path.parent.parent
            hint = (f"it is the final model of the run {owner}: give that" if (owner / "config.json").is_file() else
                    "give a run directory (runs/NAME)")
            raise ConfigError(f"{path.parent} is a model directory, not a poetlm run directory; {hint}")
        return config_from_dict(values)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: is {path.parent} a poetlm run directory?") from None
    except NotADirectoryError:
        raise ConfigError(f"{path.parent} is a file: give the run directory (e.g. runs/NAME), not a file in it") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is corrupt ({error}); it is the run's resolved config and cannot be guessed") from None
