"""Adapter files: only what a POET finetune changed, enough to rebuild its exact weights on the base.

A merge folds the rotations into W0, so the final rotation parameters alone do not reproduce a
finetuned model. An adapter therefore keeps the history: the rotation parameters just before each
merge, the current ones, and any other parameters the user trained. Loading replays the same merges
in the same order on the same base weights (coordinates are a pure function of seed, layer name and
merge count), which rebuilds the same W0 and hence the same logits.

The history of a layer grows by its rotation parameters r at every merge; once m·r reaches the size of
its weight (in·out), the adapter stores that layer's final W0 (fp32) instead, which is just as exact.
So a layer never costs more than min(m·r, in·out) + r numbers, the current rotations included.

The PEFT-shaped wrapper `poetlm.get_poet_model` does this bookkeeping itself.

Usage in a training loop:
    model = poetize(base, POETConfig(init="keep", ...)); fingerprint = base_fingerprint(model)
    history = MergeHistory()
    ... every merge_every steps: history.record(model); merge(model, optimizer)
    save_adapter(model, "run.safetensors", history=history, trained=[...], base_fingerprint=fingerprint)
    later: model = load_adapter(LlamaForCausalLM.from_pretrained(base_dir), "run.safetensors")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import POETConfig
from .layer import POETLinear, is_conv1d, whole_value
from .model import merge, poet_layers, poetize

FORMAT = "poetlm-adapter"
VERSION = 2  # 2: layers whose history outgrew their weight store their final W0
_META_KEY = "poetlm_adapter"
_SIDES = ("rotation_in.skew", "rotation_out.skew")


class AdapterError(ValueError):
    """An adapter file that cannot be read, or that does not fit the base model it is applied to."""


def _rotations(model: nn.Module) -> dict[str, torch.Tensor]:
    # Kept in the parameters' own (master, fp32) dtype: any rounding here would change the replayed W0.
    # Sharded (FSDP2) rotations are gathered, a collective: a training loop records on every rank.
    return {f"{name}.{side}": whole_value(layer.get_parameter(side).detach()).to("cpu", copy=True)
            for name, layer in poet_layers(model) for side in _SIDES}


def _merge_count(model: nn.Module) -> int:
    counts = {int(layer.merge_count) for _, layer in poet_layers(model)}
    if not counts:
        raise ValueError("the model has no POET layers: wrap it with poetlm.poetize first")
    if len(counts) > 1:
        raise ValueError(f"POET layers have merged different numbers of times {sorted(counts)}; "
                         "an adapter can only replay poetlm.merge(model), which merges them all together")
    return counts.pop()


class MergeHistory:
    """The rotation parameters as they were just before each merge: what an adapter needs to replay them.

    Call record(model) right before every poetlm.merge(model, ...) (a POETModel does it itself). Record i
    holds what merge i folded in, on the coordinates drawn for merge count i. A layer whose records
    have reached the size of its weight is dropped from all of them: the adapter then stores its W0.
    Save state_dict() with training checkpoints so a resumed run keeps the earlier records.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, torch.Tensor]] = []

    def record(self, model: nn.Module) -> None:
        merged = _merge_count(model)
        if merged != len(self.records):  # a missed record would make every later replay diverge silently
            raise ValueError(f"MergeHistory holds {len(self.records)} record(s) but the model has merged {merged} time(s): "
                             "call history.record(model) right before every poetlm.merge(model), and restore "
                             "history.load_state_dict(...) together with the model when resuming")
        record = _rotations(model)
        if self.records:  # layers dropped earlier stay dropped
            record = {key: t for key, t in record.items() if key in self.records[0]}
        self.records.append(record)
        for name, layer in poet_layers(model):
            keys = [f"{name}.{side}" for side in _SIDES]
            if keys[0] in record and len(self.records) * sum(record[k].numel() for k in keys) >= layer.weight0.numel():
                for past in self.records:
                    for key in keys:
                        del past[key]

    def __len__(self) -> int:
        return len(self.records)

    def state_dict(self) -> dict:
        return {"records": [dict(record) for record in self.records]}

    def load_state_dict(self, state: dict) -> None:
        records = state.get("records") if isinstance(state, dict) else None
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and all(isinstance(t, torch.Tensor) for t in r.values()) for r in records):
            raise ValueError("MergeHistory.load_state_dict expects the dict returned by MergeHistory.state_dict()")
        self.records = [{key: t.detach().to("cpu", copy=True) for key, t in record.items()} for record in records]


def base_fingerprint(model: nn.Module) -> dict[str, dict]:
    """Cheap checksums (float64 sum and sum of squares) of the original weight of every linear layer, with
    its dtype and the checksums of the weight rounded to each narrower dtype (a base loaded in bf16 is then
    recognized as the rounding of the fp32 base an adapter was made on).

    Works on the model before poetize or right after it: a POET layer's weight0 is the original weight
    only until its first merge, so take the fingerprint at wrap time and hand it to save_adapter.
    """
    prints = {}
    for name, module in model.named_modules():
        if isinstance(module, POETLinear):
            if int(module.merge_count):
                raise ValueError(f"layer {name!r} has merged {int(module.merge_count)} time(s), so its weight0 is no "
                                 "longer the base weight: compute base_fingerprint(model) right after poetize")
            weight, dtype = module.weight0, module.weight_dtype  # W0 is an fp32 copy of the weight's values
        elif isinstance(module, nn.Linear) or is_conv1d(module):  # sums are the same for Conv1D's transposed layout
            weight, dtype = module.weight, module.weight.dtype
        else:
            continue
        weight = weight.detach()
        prints[name] = {**_sums(weight), "dtype": _dtype_name(dtype),
                        **{_dtype_name(narrow): _sums(weight.to(narrow)) for narrow in _NARROW if narrow.itemsize < dtype.itemsize}}
    return prints


_NARROW = (torch.bfloat16, torch.float16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sums(weight: torch.Tensor) -> dict[str, float]:
    w = weight.double()
    # 12 digits: far below float32 noise would matter, and readable in the file's metadata.
    return {"sum": float(f"{w.sum().item():.12g}"), "sumsq": float(f"{w.square().sum().item():.12g}")}


_compute_fingerprint = base_fingerprint  # save_adapter's keyword argument shadows the name


def _same_weights(a: dict, b: dict, numel: int) -> bool:
    # |sum| <= sqrt(numel·sumsq), so that bound sets the scale for comparing sums that may be near zero.
    scale = math.sqrt(numel * max(a["sumsq"], b["sumsq"]))
    return (math.isclose(a["sumsq"], b["sumsq"], rel_tol=1e-5, abs_tol=1e-12)
            and abs(a["sum"] - b["sum"]) <= 1e-5 * scale + 1e-12)


def fingerprint_mismatch(actual: dict, expected: dict, sizes: dict[str, int], made: str) -> str | None:
    """Why the base fingerprinted as `actual` is not the one `expected` was taken of, or None if it is, over
    the layers {name: numel} of `sizes`; `made` names what was made on `expected` (e.g. "the adapter").

    A base loaded in another dtype is compared at the narrower one: the narrower weights are the rounding
    of the wider, and replaying merges on either is as sound as loading that base at all (they run in fp32).
    """
    for name, numel in sizes.items():
        here, there = actual[name], expected[name]
        ours, theirs = here.get("dtype"), there.get("dtype")
        if ours and theirs and ours != theirs:  # older fingerprints record no dtype: compared as they are
            if ours in there:
                there = there[ours]
            elif theirs in here:
                here = here[theirs]
            else:
                return (f"the base was loaded as {ours} but {made} was made on {theirs}: load the base with "
                        f"torch_dtype=torch.{theirs}")
        if not _same_weights(here, there, numel):
            return (f"{made} was made for a different base model: the weights of {name!r} differ (sum, sum of squares "
                    f"{here['sum']:.8g}, {here['sumsq']:.8g} here; {there['sum']:.8g}, {there['sumsq']:.8g} in {made}); "
                    f"load the base checkpoint {made} was trained from")
    return None


def save_adapter(model: nn.Module, path, *, history: MergeHistory, trained: list[str] | None = None,
                 base_fingerprint: dict | None = None) -> None:
    """Write the merge history, current rotations and the `trained` parameters to one .safetensors file.

    `trained`: names (as in model.named_parameters()) of the non-rotation parameters that were trained.
    `base_fingerprint`: base_fingerprint(model) taken right after poetize; may be left out only while
    the model has not merged yet.
    """
    layers = dict(poet_layers(model))
    for layer in layers.values():  # one rank writes the file: gathering shards here would wait for the others
        layer.require_whole("save_adapter")
    merged = _merge_count(model)
    if len(history) != merged:
        raise ValueError(f"the history holds {len(history)} record(s) but the model has merged {merged} time(s): "
                         "call history.record(model) right before every poetlm.merge(model)")
    config = next(iter(layers.values())).config
    if any(layer.config != config for layer in layers.values()):
        raise ValueError("the POET layers were wrapped with different POETConfigs; an adapter stores one config")
    if base_fingerprint is None:
        if merged:
            raise ValueError("pass base_fingerprint=base_fingerprint(model) computed right after poetize: "
                             "merges have changed weight0, so the base weights can no longer be fingerprinted")
        base_fingerprint = _compute_fingerprint(model)
    lacking = [name for name in layers if name not in base_fingerprint]
    if lacking:
        raise ValueError(f"base_fingerprint has no entry for layer {lacking[0]!r}: compute it with "
                         "base_fingerprint(model) on this model right after poetize")

    current = _rotations(model)
    tensors = {f"current.{key}": t for key, t in current.items()}
    replayed = history.records[0].keys() if history.records else current.keys()
    for i, record in enumerate(history.records):
        if record.keys() != replayed or not replayed <= current.keys():
            raise ValueError(f"merge record {i} covers other layers than the model's POET layers; "
                             "was the history recorded on another model?")
        tensors.update({f"merge.{i}.{key}": t for key, t in record.items()})
    stored_w0 = [name for name in layers if f"{name}.{_SIDES[0]}" not in replayed]
    for name in stored_w0:  # exact without the history, and no larger than it
        tensors[f"weight0.{name}"] = layers[name].weight0.detach().to("cpu", copy=True).contiguous()
        tensors[f"probe_rotated.{name}"] = layers[name].probe_rotated.detach().to("cpu", copy=True)
    trained = list(dict.fromkeys(trained or []))
    rotation_ids = {id(p) for layer in layers.values() for p in layer.rotation_parameters()}
    for name in trained:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise ValueError(f"trained name {name!r} is not a parameter of the model (use names from model.named_parameters())") from None
        if id(param) in rotation_ids:
            raise ValueError(f"{name!r} is a rotation parameter: those are always saved, list only other trained parameters")
        tensors[f"trained.{name}"] = param.detach().to("cpu", copy=True).contiguous()

    info = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "merges": merged,
            "layers": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
            "stored_w0": stored_w0,
            "trained": trained, "base_fingerprint": {name: base_fingerprint[name] for name in layers}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a crash mid-write must never leave a half-written file under the real name
        save_file(tensors, str(tmp), metadata={"format": "pt", _META_KEY: json.dumps(info)})
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ADAPTER_FILE = "adapter.safetensors"  # its name in a run directory and in a POETModel.save_adapter directory


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if path.is_dir() and (path / ADAPTER_FILE).is_file():  # a run's or save_adapter's directory, as from_pretrained takes
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: no adapter file there ({'a directory without ' + ADAPTER_FILE if path.is_dir() else 'no such file'}); "
                           "pass the path that poetlm.adapter.save_adapter wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise AdapterError(f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt: "
                           "save the adapter again with save_adapter") from error
    if _META_KEY not in metadata:
        raise AdapterError(f"{path} is a safetensors file but not a poetlm adapter (no {_META_KEY!r} metadata); "
                           "model weights load with from_pretrained, adapters are written by save_adapter")
    try:
        info = json.loads(metadata[_META_KEY])
        if info["format"] != FORMAT or int(info["version"]) > VERSION:
            raise AdapterError(f"{path} holds {info['format']!r} version {info['version']}; this poetlm reads "
                               f"{FORMAT!r} up to version {VERSION}: upgrade poetlm")
        info["config"] = POETConfig.from_dict(info["config"])
        info["merges"] = int(info["merges"])
        info["layers"] = {name: tuple(shape) for name, shape in info["layers"].items()}
        info["trained"] = list(info["trained"])
        info["stored_w0"] = list(info.get("stored_w0", []))  # version 1 replays every layer
        info["base_fingerprint"] = dict(info["base_fingerprint"])
    except AdapterError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AdapterError(f"{path}: the poetlm adapter metadata is corrupt ({error!r}); save the adapter again") from error
    problem = _inconsistency(info, tensors)
    if problem:
        raise AdapterError(f"{path}: {problem}; the file was edited or damaged: save the adapter again")
    return info, tensors


def _inconsistency(info: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """What in an adapter's metadata disagrees with itself or with its tensors (a replay would build another
    model, or fail deep inside), or None."""
    if info["merges"] < 0:
        return f"it records {info['merges']} merges"
    replayed = [name for name in info["layers"] if name not in info["stored_w0"]]
    recorded = {int(key.split(".")[1]) for key in tensors if key.startswith("merge.")}
    if replayed and recorded != set(range(info["merges"])):
        return (f"it records {info['merges']} merge(s) but holds the rotations of merge(s) {sorted(recorded)[:6]}"
                f"{' ...' if len(recorded) > 6 else ''}")
    for name in info["layers"]:
        entry = info["base_fingerprint"].get(name)
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), (int, float)) for key in ("sum", "sumsq"))):
            return f"its base_fingerprint has no valid entry for layer {name!r}"
    bad = next((key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        return f"tensor {bad!r} holds NaN or inf (the training that wrote it had diverged)"
    return None


def check_base_layers(model: nn.Module, layers: dict[str, tuple], path: Path) -> None:
    """Refuse a base that is not the plain model with the adapter's layers {name: (in, out)}: it is poetized
    already, or lacks one of them, or has it in another kind or shape."""
    if next(poet_layers(model), None) is not None:
        raise AdapterError("load_adapter expects the plain base model, but it already has POET layers; "
                           "load a fresh base (e.g. with from_pretrained)")
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise AdapterError(f"{path}: this adapter was made for a different base model: the base has no layer(s) "
                           f"{missing[:4]}{' ...' if len(missing) > 4 else ''} ({len(missing)} missing)")
    for name, shape in layers.items():
        module = modules[name]
        if is_conv1d(module):
            in_out = tuple(module.weight.shape)
        elif isinstance(module, nn.Linear):
            in_out = (module.in_features, module.out_features)
        else:
            raise AdapterError(f"{path}: this adapter was made for a different base model: layer {name!r} is "
                               f"a {type(module).__name__}, not an nn.Linear or Conv1D")
        if in_out != shape:
            raise AdapterError(f"{path}: this adapter was made for a different base model: layer {name!r} is (in, out) "
                               f"shape {in_out} in the base but has (in, out) shape {shape} in the adapter")


def _check_fingerprint(model: nn.Module, info: dict, path: Path) -> None:
    sizes = {name: fan_in * fan_out for name, (fan_in, fan_out) in info["layers"].items()}
    mismatch = fingerprint_mismatch(_compute_fingerprint(model), info["base_fingerprint"], sizes, "this adapter")
    if mismatch:
        raise AdapterError(f"{path}: {mismatch}")


def _stored(tensors: dict, key: str, shape: torch.Size, path: Path) -> torch.Tensor:
    """The adapter's tensor `key`, refused unless it is there in `shape`."""
    tensor = tensors.get(key)
    if tensor is None:
        raise AdapterError(f"{path}: tensor {key!r} is missing; the file is corrupt or was not written by save_adapter")
    if tensor.shape != shape:
        raise AdapterError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                           f"{tuple(shape)}; this adapter was made for a different base model or poetlm version")
    return tensor


def _load_into(param: torch.Tensor, tensors: dict, key: str, path: Path) -> None:
    param.copy_(_stored(tensors, key, param.shape, path))


def read_adapter_info(path) -> dict:
    """An adapter's metadata: config (POETConfig), merges, layers {name: (in, out)}, trained, stored_w0
    (layers stored as their final W0) and base_fingerprint."""
    return _read(Path(path))[0]


def load_adapter(base_model: nn.Module, path, history: MergeHistory | None = None) -> nn.Module:
    """Wrap `base_model` (in place) with the adapter's config, replay its merges and load its tensors.

    The base must be the plain model the adapter was trained from (e.g. fresh from from_pretrained).
    Wrong bases are refused before the model is touched, except for extra targeted layers, which only
    show once it has been wrapped. `history`, if given, receives the adapter's merge records, so that
    training can go on and save a new adapter.
    """
    path = Path(path)
    info, tensors = _read(path)
    config, layers = info["config"], info["layers"]
    check_base_layers(base_model, layers, path)
    if config.init == "keep":  # W0 is the base weight: catch a wrong base before wrapping it
        _check_fingerprint(base_model, info, path)
    # The other trained tensors keep their names through poetize (norms, embeddings, biases): checked here,
    # before the base is wrapped, they are loaded after the replay below.
    for name in info["trained"]:
        try:
            param = base_model.get_parameter(name)
        except AttributeError:
            raise AdapterError(f"{path}: the adapter trained {name!r}, which the base model does not have; "
                               "this adapter was made for a different base model") from None
        _stored(tensors, f"trained.{name}", param.shape, path)
    model = poetize(base_model, config)
    extra = sorted({name for name, _ in poet_layers(model)} - set(layers))
    if extra:
        raise AdapterError(f"{path}: this adapter was made for a different base model: the base has extra layer(s) "
                           f"{extra[:4]}{' ...' if len(extra) > 4 else ''} that the adapter does not cover "
                           "(the base has been wrapped in place: reload it before trying another adapter)")
    if config.init != "keep":  # W0 was drawn from the seed: check it is the draw that was trained
        _check_fingerprint(model, info, path)

    stored_w0 = set(info["stored_w0"])

    def load_rotations(prefix: str) -> None:
        for name, layer in poet_layers(model):
            for side in _SIDES:
                if prefix.startswith("merge.") and name in stored_w0:  # replayed as the identity, W0 loaded below
                    layer.get_parameter(side).zero_()
                else:
                    _load_into(layer.get_parameter(side), tensors, f"{prefix}{name}.{side}", path)

    with torch.no_grad():
        for i in range(info["merges"]):
            load_rotations(f"merge.{i}.")
            merge(model)
        for name in stored_w0:
            layer = model.get_submodule(name)
            _load_into(layer.weight0, tensors, f"weight0.{name}", path)
            _load_into(layer.probe_rotated, tensors, f"probe_rotated.{name}", path)
        load_rotations("current.")
        for name in info["trained"]:
            _load_into(model.get_parameter(name), tensors, f"trained.{name}", path)
    if history is not None:
        history.records = [{key[len(f"merge.{i}."):]: t for key, t in tensors.items() if key.startswith(f"merge.{i}.")}
                           for i in range(info["merges"])]
    return model
