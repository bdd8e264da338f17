"""A PEFT-shaped finetuning API: `get_poet_model(base, config)` returns a `POETModel`.

The wrapper poetizes the base with W0 = the pretrained weights (init="keep"), freezes everything but
the rotations (and the parameters named in `trainable`), records its own merge history (every
`poetlm.merge` on it, from any loop, Trainer callback or MergeSchedule), and saves and loads adapters:

    model = poetlm.get_poet_model(AutoModelForCausalLM.from_pretrained(base_dir), POETConfig(block_size=64))
    ... train (merges through poetlm.merge(model, optimizer) or poetlm.integrations) ...
    model.save_adapter("adapter/")                      # adapter_config.json + adapter.safetensors
    model = POETModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "adapter/")
    dense = model.merge_and_unload()                    # the base model with the adapter folded in
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import re
from pathlib import Path

import torch
from torch import nn

from .adapter import (ADAPTER_FILE, FORMAT, VERSION, AdapterError, MergeHistory, base_fingerprint, check_base_layers, fingerprint_mismatch,
                      load_adapter, read_adapter_info, save_adapter)
from .config import POETConfig, checked
from .layer import is_conv1d
from .model import merge, poet_layers, poetize, refuse_poetized, replace_module, rotation_parameters, target_linears, unpoetize

CONFIG_NAME = "adapter_config.json"


def get_poet_model(base_model: nn.Module, config: POETConfig | None = None, trainable: list[str] | tuple | str = (),
                   keep_base_weights: bool = False) -> "POETModel":
    """Wrap a pretrained model for POET finetuning (in place); see POETModel."""
    return POETModel(base_model, config, trainable, keep_base_weights)


class _Originals(nn.Module):
    """Tensors disable_adapter() swaps back in: buffers, so they follow .to(), but kept out of state dicts."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for i, tensor in enumerate(tensors.values()):
            self.register_buffer(f"t{i}", tensor, persistent=False)

    def items(self):
        return [(name, getattr(self, f"t{i}")) for i, name in enumerate(self.names)]


def _check_arguments(base_model, keep_base_weights) -> None:
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"POET wraps a model: pass the base model (a torch.nn.Module, e.g. "
                        f"AutoModelForCausalLM.from_pretrained(...)), not a {type(base_model).__name__} ({base_model!r:.40})")
    if not isinstance(keep_base_weights, bool):
        raise TypeError(f"keep_base_weights={keep_base_weights!r} is invalid: pass True or False")


def _originals(base_model: nn.Module, layers: list[str], trainable: list[str], keep_base_weights: bool) -> tuple[dict, dict]:
    """What disable_adapter() needs of the base: its extra trainable tensors (copies: training changes them
    in place) and, if asked, the weights of the layers POET wraps (`layers`) as (out, in) (no copies: the
    wrapped modules are dropped and W0 is a copy)."""
    extras = {name: p.detach().clone() for name, p in base_model.named_parameters() if _matches_any(name, trainable)}
    weights = {}
    if keep_base_weights:
        for name in layers:
            module = base_model.get_submodule(name)
            weights[name] = module.weight.detach().t() if is_conv1d(module) else module.weight.detach()
    return extras, weights


def _matches_any(name: str, patterns: list[str]) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def _trainable_patterns(base_model: nn.Module, config: POETConfig, trainable) -> list[str]:
    """`trainable` as a list of regular expressions, each matching some parameter and none of the weights
    POET wraps (they become the fixed W0: training one would change the spectrum POET keeps)."""
    if not (isinstance(trainable, str) or isinstance(trainable, (list, tuple)) and all(isinstance(t, str) for t in trainable)):
        raise TypeError(f"trainable={trainable!r} is invalid: pass regular expressions of parameter names to train "
                        "besides the rotations, e.g. ['norm'] or 'bias$', or () for none")
    patterns = [trainable] if isinstance(trainable, str) else list(trainable)
    names = [name for name, _ in base_model.named_parameters()]
    wrapped = {f"{name}.weight" for name, _ in target_linears(base_model, config)}
    for pattern in patterns:
        try:
            matched = [name for name in names if re.search(pattern, name)]
        except (re.error, TypeError) as error:
            raise ValueError(f"trainable={patterns!r}: {pattern!r} is not a regular expression ({error})") from None
        if not matched:
            raise ValueError(f"trainable={patterns!r}: {pattern!r} matches no parameter of the model (its names look "
                             f"like {names[:4]})")
        fixed = [name for name in matched if name in wrapped]
        if fixed:
            raise ValueError(f"trainable={patterns!r}: {pattern!r} matches {fixed[0]!r}, the weight of a layer POET wraps, "
                             "which becomes its fixed W0 (POET trains it through the rotations only): narrow the pattern, "
                             "e.g. to norms or biases ('norm', 'bias$')")
    return patterns


def write_adapter_config(directory: Path, base_model: nn.Module, config: POETConfig, trainable: list[str], merges: int) -> None:
    """adapter_config.json beside adapter.safetensors: what POETModel.from_pretrained reads back."""
    base_config = getattr(base_model, "config", None)
    settings = {"format": FORMAT, "version": VERSION, "poet_config": config.to_dict(),
                "trainable": trainable, "merges": merges, "adapter_file": ADAPTER_FILE,
                "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None}
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")


HISTORY = "poet_merge_history."


def _save_history(module, state_dict, prefix, local_metadata) -> None:
    # Checkpoints of the model alone (Trainer's, model.state_dict()) must carry what earlier merges folded in:
    # a resumed run's adapter replays them. Flat tensors, so safetensors can store them.
    records = module.history.records
    state_dict[prefix + HISTORY + "count"] = torch.tensor(len(records))
    for index, record in enumerate(records):
        for key, tensor in record.items():
            state_dict[f"{prefix}{HISTORY}{index}.{key}"] = tensor


def _load_history(module, state_dict, prefix, *args) -> None:
    count = state_dict.pop(prefix + HISTORY + "count", None)
    if count is None:  # a state dict without a history (a partial one, or a plain base model's) leaves it as is
        return
    records = [{} for _ in range(int(count))]
    for key in [key for key in state_dict if key.startswith(prefix + HISTORY)]:
        index, _, name = key[len(prefix + HISTORY):].partition(".")
        records[int(index)][name] = state_dict.pop(key)
    module.history.load_state_dict({"records": records})


REPLAY = "poet_replay"
# The settings a merge's coordinates and maps are drawn from: a history replays only under the same ones.
_REPLAY_FIELDS = ("variant", "block_size", "fraction", "parameterization", "neumann_terms", "seed")


def _replay(module: "POETModel") -> dict:
    return {"poet_config": {name: getattr(module.poet_config, name) for name in _REPLAY_FIELDS},
            "base_fingerprint": module.fingerprint}


def _save_replay(module, state_dict, prefix, local_metadata) -> None:
    # What the history replays on goes with it: loaded into a model with other settings or another base, it
    # would give that model's logits now, but an adapter saved from it would rebuild another model.
    # JSON bytes in a tensor: safetensors (Trainer's checkpoints) stores nothing else.
    state_dict[prefix + REPLAY] = torch.tensor(list(json.dumps(_replay(module)).encode()), dtype=torch.uint8)


def _check_replay(module, state_dict, prefix, *args) -> None:
    saved = state_dict.pop(prefix + REPLAY, None)
    if saved is None:  # written before poetlm saved it, or a partial state dict: nothing to check against
        return
    saved, ours = json.loads(bytes(saved.tolist()).decode()), _replay(module)
    for name, value in saved["poet_config"].items():
        if ours["poet_config"][name] != value:
            raise ValueError(f"the state dict was saved by a POETModel with POETConfig.{name}={value!r}, but this one has "
                             f"{name}={ours['poet_config'][name]!r}: its merges replay only under the same settings; build "
                             f"this model with POETConfig({name}={value!r})")
    sizes = {name: layer.weight0.numel() for name, layer in poet_layers(module.base_model) if name in saved["base_fingerprint"]}
    mismatch = fingerprint_mismatch(ours["base_fingerprint"], saved["base_fingerprint"], sizes, "the state dict")
    if mismatch:
        raise ValueError(mismatch)


def _tied_names(module: nn.Module) -> dict[str, str]:
    """{alias: first name} of parameters registered under several names (tied embeddings)."""
    first, aliases = {}, {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _drop_tied(module, state_dict, prefix, local_metadata) -> None:
    # Trainer saves a model that is not a PreTrainedModel with safetensors, which refuses a tensor stored
    # under two names; loading re-adds the alias (_restore_tied).
    for alias in _tied_names(module):
        state_dict.pop(prefix + alias, None)


def _restore_tied(module, state_dict, prefix, *args) -> None:
    for alias, name in _tied_names(module).items():
        if prefix + name in state_dict:
            state_dict.setdefault(prefix + alias, state_dict[prefix + name])


def _call_base(model: "POETModel", *args, **kwargs):
    return model.base_model(*args, **kwargs)


# Read on the class, POETModel.forward cannot know its base; transformers' Trainer looks there for the label
# columns (find_labels), which Hugging Face models name `labels`.
_call_base.__signature__ = inspect.signature(lambda self, *args, labels=None, **kwargs: None)


class _BaseForward(functools.partial):
    """A POETModel's forward, with its base model's signature: Trainer keeps only the dataset columns that
    inspect.signature(model.forward) names, and (*args, **kwargs) would name none of them."""

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.args[0].base_model.forward)


class _Forward:
    """POETModel.forward: the base model called with the arguments as given, whatever its forward takes."""

    def __get__(self, model, owner=None):
        return _call_base if model is None else _BaseForward(_call_base, model)


def _check_settings(settings, info: dict, path: Path) -> None:
    """adapter_config.json must describe the adapter file beside it: hand edits that change nothing would
    mislead whoever reads the file, and a `trainable` of another form would be read as something else."""
    if not isinstance(settings, dict):
        raise AdapterError(f"{path} holds a JSON {type(settings).__name__}, not the object POETModel.save_adapter writes; "
                           "save the adapter again")
    expected = {"format": FORMAT, "adapter_file": ADAPTER_FILE, "merges": info["merges"]}
    for key, value in expected.items():
        if key in settings and settings[key] != value:
            raise AdapterError(f"{path}: {key}={settings[key]!r}, but the adapter beside it ({ADAPTER_FILE}) has "
                               f"{key}={value!r}; restore the file, or save the adapter again")
    version = settings.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise AdapterError(f"{path}: version {version!r}; this poetlm reads adapters up to version {VERSION}: upgrade poetlm")
    if "poet_config" in settings:
        try:
            config = POETConfig.from_dict(settings["poet_config"])
        except (ValueError, TypeError, AttributeError) as error:
            raise AdapterError(f"{path}: its poet_config is not valid ({error})") from None
        if config != info["config"]:
            differ = next(f.name for f in dataclasses.fields(POETConfig) if getattr(config, f.name) != getattr(info["config"], f.name))
            raise AdapterError(f"{path}: poet_config.{differ}={getattr(config, differ)!r}, but the adapter beside it was "
                               f"trained with {differ}={getattr(info['config'], differ)!r}; a loaded adapter keeps the "
                               "settings it was trained with: restore the file, or finetune again with the new settings")


class POETModel(nn.Module):
    """A pretrained model under POET finetuning (see the module docstring).

    config: block layout and seed (init is always "keep": W0 is the pretrained weight).
    trainable: regular expressions of other parameter names to train too (e.g. ["norm"], ["bias$"]);
        they are saved in the adapter.
    keep_base_weights: keep the base weights of the wrapped layers, so that disable_adapter() can give
        the base model's outputs after merges (which fold the adapter into W0). Costs one more copy of
        those weights; without it disable_adapter() works until the first merge.

    Attributes the wrapper does not have are looked up on the base model (config, generate, ...).
    """

    def __init__(self, base_model: nn.Module, config: POETConfig | None = None, trainable: list[str] | tuple = (),
                 keep_base_weights: bool = False) -> None:
        super().__init__()
        _check_arguments(base_model, keep_base_weights)
        refuse_poetized(base_model)
        config = dataclasses.replace(checked(config or POETConfig(), POETConfig), init="keep")
        trainable = _trainable_patterns(base_model, config, trainable)
        layers = [name for name, _ in target_linears(base_model, config)]
        originals = _originals(base_model, layers, trainable, keep_base_weights)
        base_model = poetize(base_model, config)
        self._setup(base_model, config, trainable, originals, MergeHistory(), base_fingerprint(base_model))

    def _setup(self, base_model, config, trainable, originals, history, fingerprint) -> None:
        self.base_model = base_model
        self.poet_config = config
        self.trainable = list(trainable)
        self.history = history
        self.fingerprint = fingerprint
        self.base_extras, self.base_weights = _Originals(originals[0]), _Originals(originals[1])
        rotations = {id(p) for p in rotation_parameters(base_model)}
        for name, param in base_model.named_parameters():
            param.requires_grad_(id(param) in rotations or _matches_any(name, self.trainable))
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_restore_tied)
        self.register_state_dict_post_hook(_save_replay)
        self.register_load_state_dict_pre_hook(_check_replay)  # before anything of the state dict is taken
        self.register_state_dict_post_hook(_save_history)
        self.register_load_state_dict_pre_hook(_load_history)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory, keep_base_weights: bool = False) -> "POETModel":
        """Re-apply an adapter written by save_adapter to a fresh copy of its base (exact; training can go on)."""
        _check_arguments(base_model, keep_base_weights)
        directory = Path(directory)
        try:
            settings = json.loads((directory / CONFIG_NAME).read_text())
        except (OSError, ValueError) as error:
            raise AdapterError(f"{directory} holds no readable {CONFIG_NAME} ({error}); pass the directory "
                               "POETModel.save_adapter wrote") from None
        info = read_adapter_info(directory / ADAPTER_FILE)
        _check_settings(settings, info, directory / CONFIG_NAME)
        check_base_layers(base_model, info["layers"], directory / ADAPTER_FILE)  # before _originals reads them
        try:  # as get_poet_model checks them: a pattern reaching a wrapped weight would train its fixed W0
            trainable = _trainable_patterns(base_model, info["config"], settings.get("trainable", []))
        except (ValueError, TypeError) as error:
            raise AdapterError(f"{directory / CONFIG_NAME}: {error}") from None
        originals = _originals(base_model, list(info["layers"]), trainable, keep_base_weights)
        history = MergeHistory()
        load_adapter(base_model, directory / ADAPTER_FILE, history=history)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._setup(base_model, info["config"], trainable, originals, history, info["base_fingerprint"])
        return model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    forward = _Forward()

    def poet_before_merge(self) -> None:
        """Called by poetlm.merge: what the merge folds in goes into the adapter's history."""
        self._require_adapter("a merge")
        self.history.record(self.base_model)

    def _require_adapter(self, operation: str) -> None:
        """Refuse what needs the POET layers once merge_and_unload() or unload() has replaced them."""
        unloaded = self.__dict__.get("_unloaded")
        if unloaded:
            raise AdapterError(f"{operation} needs the adapter, but {unloaded} has replaced this model's POET layers by plain "
                               "ones (the model it returned is the result); wrap a base model again with "
                               "get_poet_model or POETModel.from_pretrained to go on with POET")

    def _base_weights(self, operation: str, layers: dict) -> dict[str, torch.Tensor]:
        """The wrapped layers' base weights, (out, in), as far as W0 no longer holds them (after merges)."""
        merges = max((int(layer.merge_count) for layer in layers.values()), default=0)
        base_weights = dict(self.base_weights.items())
        if merges and not base_weights:
            raise RuntimeError(f"{operation} after {merges} merge(s) needs the base weights, into which the merges "
                               "have folded the adapter: create the model with get_poet_model(..., keep_base_weights=True) "
                               "(one more copy of the wrapped weights), or load the base model separately")
        return base_weights

    def merge(self, optimizer: torch.optim.Optimizer | None = None, rule=None, *, gather=None) -> int:
        """poetlm.merge(self, optimizer, rule, gather=gather)."""
        return merge(self, optimizer, rule, gather=gather)

    def save_adapter(self, directory) -> None:
        """Write adapter_config.json and adapter.safetensors (merge history, rotations, trained tensors)."""
        self._require_adapter("save_adapter()")
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise AdapterError(f"save_adapter({str(directory)!r}): that is a file; an adapter is a directory "
                               f"({CONFIG_NAME} and {ADAPTER_FILE}): pass a new or existing directory")
        directory.mkdir(parents=True, exist_ok=True)
        rotations = {id(p) for p in rotation_parameters(self.base_model)}
        trained = [n for n, p in self.base_model.named_parameters() if p.requires_grad and id(p) not in rotations]
        save_adapter(self.base_model, directory / ADAPTER_FILE, history=self.history, trained=trained,
                     base_fingerprint=self.fingerprint)
        write_adapter_config(directory, self.base_model, self.poet_config, self.trainable, len(self.history))

    def save_pretrained(self, save_directory) -> None:
        """PEFT's name for save_adapter: the directory POETModel.from_pretrained(base, save_directory) reads.
        For a whole model directory: poetlm.save_pretrained(model, directory), or merge_and_unload().save_pretrained."""
        self.save_adapter(save_directory)

    def merge_and_unload(self) -> nn.Module:
        """The base model with every POET layer replaced (in place) by the plain layer it computes."""
        self._require_adapter("merge_and_unload()")
        model = unpoetize(self.base_model)
        self._unloaded = "merge_and_unload()"
        return model

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The base model as it was before finetuning (in place): every POET layer replaced by a plain layer
        holding its base weight, the other trained parameters restored. After merges it needs
        keep_base_weights=True, as disable_adapter() does."""
        self._require_adapter("unload()")
        layers = dict(poet_layers(self.base_model))
        base_weights = self._base_weights("unload()", layers)
        model = self.base_model
        for name, layer in layers.items():  # before any merge, W0 is the base weight itself
            model = replace_module(model, name, layer.to_dense(base_weights.get(name, layer.weight0)))
        for name, original in self.base_extras.items():
            model.get_parameter(name).copy_(original)
        self._unloaded = "unload()"
        return model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model computes what the base model computed (no gradients reach the rotations)."""
        self._require_adapter("disable_adapter()")
        layers = dict(poet_layers(self.base_model))
        base_weights = self._base_weights("disable_adapter()", layers)
        saved = {name: layer.step_weight for name, layer in layers.items()}
        extras = [(self.base_model.get_parameter(name), original) for name, original in self.base_extras.items()]
        trained = [param.data for param, _ in extras]
        try:
            for name, layer in layers.items():  # before any merge, W0 is the base weight itself
                layer.step_weight = base_weights.get(name, layer.weight0)
            for param, original in extras:
                param.data = original
            yield self
        finally:
            for name, layer in layers.items():
                layer.step_weight = saved[name]
            for (param, _), data in zip(extras, trained):
                param.data = data
