"""Save and load POET models as Hugging Face directories that no loader can misread.

`save_pretrained(model, dir)` writes an ordinary Hugging Face directory holding the *dense* model (every
POET layer as the nn.Linear / Conv1D it computes, under the usual names), so `from_pretrained` from
transformers, or any tool reading the directory, gets the model's exact function. Next to it:

- `poetlm_config.json`: the POETConfig of every wrapped layer, the layer list, the trainable parameters;
- `poetlm_state.safetensors`: what POET needs beyond the dense weights — W0 (fp32), the rotation
  parameters, the coordinates, merge counts and probes.

`from_pretrained(dir)` loads the dense directory with transformers, re-wraps exactly the recorded layers
and loads that state: same logits, same merge counts and coordinates, and training continues.
`merged=True` leaves the two poetlm files out: a plain dense model.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import POETConfig
from .layer import POETConv1D, POETLinear, wrap_module
from .model import poet_layers, replace_module
from .primitives import plain_name
from .tuner import POETModel

CONFIG_NAME = "poetlm_config.json"
STATE_NAME = "poetlm_state.safetensors"
WEIGHTS_NAME, SHARD_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"  # transformers' dense weights
FORMAT = "poetlm-model"
VERSION = 1


class LoadError(ValueError):
    """A directory poetlm cannot rebuild a POET model from; the message says why and what to do."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a crash mid-write must never leave a half-written file under the real name
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _layer_keys(name: str, layer: POETLinear, state: dict) -> list[str]:
    """State-dict keys only POET needs: everything of the layer but its dense weight and its bias."""
    dense = {f"{name}.weight", f"{name}.bias"}
    return [key for key in state if key.startswith(name + ".") and key not in dense]


def save_pretrained(model: nn.Module, directory, merged: bool = False, **kwargs) -> None:
    """Write `model` (a poetized transformers model) to `directory`; see the module docstring.

    merged=False (default): the dense model plus the POET state, loadable exactly with
    `poetlm.from_pretrained`. merged=True: the dense model only, for inference and for tools that do not
    know poetlm. Other keyword arguments go to transformers' `save_pretrained` (e.g. max_shard_size).
    """
    if isinstance(model, POETModel):  # its state-dict keys carry the wrapper's prefix
        model = model.base_model
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: keys and names are the plain model's
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"poetlm.save_pretrained saves transformers models; {type(model).__name__} has no save_pretrained. "
                        "For another nn.Module save model.state_dict(): it holds W0, the rotations and the coordinates, "
                        "and loads into a poetized copy with load_state_dict")
    layers = {plain_name(name): layer for name, layer in poet_layers(model)}
    if not layers:
        raise ValueError("the model has no POET layers: save it with its own save_pretrained")
    directory = Path(directory)
    state = {plain_name(key): tensor for key, tensor in model.state_dict().items()}  # compiled blocks inside, too
    poet_keys = {key for name, layer in layers.items() for key in _layer_keys(name, layer, state)}
    model.save_pretrained(directory, state_dict={k: v for k, v in state.items() if k not in poet_keys}, **kwargs)
    if merged:
        remove_poetlm_files(directory)
        return
    _remove_stale_weights(directory)
    configs = []
    for layer in layers.values():
        if layer.config not in configs:
            configs.append(layer.config)
    info = {
        "format": FORMAT, "version": VERSION, "architecture": type(model).__name__,
        "configs": [c.to_dict() for c in configs],
        "layers": {name: {"config": configs.index(layer.config), "conv1d": isinstance(layer, POETConv1D),
                          "in_features": layer.in_features, "out_features": layer.out_features,
                          "seed_key": layer.seed_key}  # what its next merges draw from: not always its name
                   for name, layer in layers.items()},
        "trainable": [plain_name(name) for name, p in model.named_parameters() if p.requires_grad],
    }
    tensors = {key: state[key].detach().to("cpu").contiguous() for key in sorted(poet_keys)}
    _atomic_write(directory / STATE_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


def _remove_stale_weights(directory: Path) -> None:
    """The weights file an earlier save left that transformers' save_pretrained keeps: the shard index of a
    sharded save under an unsharded one (its shards are gone), or the single file under a sharded one
    (which transformers would load instead of the new shards)."""
    index = directory / SHARD_INDEX_NAME
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no index (or none transformers could use)
        return
    current = all((directory / shard).is_file() for shard in shards)
    (directory / WEIGHTS_NAME if current else index).unlink(missing_ok=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def remove_poetlm_files(directory, all_weights: bool = False) -> None:
    """After a dense-only save into `directory`: remove what an earlier save there left beside it, whose POET
    state (or weights) would no longer match the new weights.

    all_weights=True, before a save over another model (`poetlm export --force`): also every weights file and
    shard index in it, whatever wrote them, since transformers loads a leftover pytorch_model.bin as readily
    as the new model.safetensors (use_safetensors=False, or another format's shards), and a PEFT adapter's
    config."""
    directory = Path(directory)
    for stale in (CONFIG_NAME, STATE_NAME):
        (directory / stale).unlink(missing_ok=True)
    if all_weights:
        for path in directory.iterdir():
            if path.is_file() and path.name.removesuffix(".index.json").endswith(WEIGHT_SUFFIXES):
                path.unlink()
        # A PEFT adapter's config without its weights: transformers would load the directory as that adapter
        (directory / "adapter_config.json").unlink(missing_ok=True)
    _remove_stale_weights(directory)


def _read_info(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        hint = ("it is a plain (or merged) model directory: load it with transformers' from_pretrained"
                if (directory / "config.json").is_file() else "it is not a model directory")
        raise LoadError(f"{directory} has no {CONFIG_NAME}, so it was not written by poetlm.save_pretrained(merged=False); {hint}")
    try:
        info = json.loads(path.read_text())
        if info["format"] != FORMAT or int(info["version"]) > VERSION:
            raise LoadError(f"{path} holds {info['format']!r} version {info['version']}; this poetlm reads {FORMAT!r} "
                            f"up to version {VERSION}: upgrade poetlm")
        info["configs"] = [POETConfig.from_dict(c) for c in info["configs"]]
        for entry in info["layers"].values():
            entry["config"] = info["configs"][int(entry["config"])]
            if not isinstance(entry.get("seed_key", ""), str):
                raise TypeError(f"seed_key {entry['seed_key']!r} is not a string")
        return info
    except LoadError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise LoadError(f"{path} is corrupt ({error!r}); save the model again with poetlm.save_pretrained") from error


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / STATE_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise LoadError(f"{path} is missing or unreadable ({error}); the directory is incomplete: "
                        "save the model again with poetlm.save_pretrained") from error


def load_dense(model_class, directory: Path, **kwargs) -> nn.Module:
    """`model_class.from_pretrained(directory)`, every way a local directory can be damaged a LoadError.

    Without config.json transformers would build the class's default configuration (a LLaMA-7B); weights
    missing from the files would be drawn at random.
    """
    if not (directory / "config.json").is_file():
        raise LoadError(f"{directory} has no config.json, which describes the model's architecture; restore it from "
                        "a copy of the directory, or save the model again")
    try:
        model, info = model_class.from_pretrained(directory, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError:
        raise LoadError(f"the pickled weights (pytorch_model*.bin) in {directory} hold Python objects other than tensors, "
                        "which are not unpickled because that can run arbitrary code; remove the file unless you know "
                        "where it came from, and save the model again") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        problem = (str(error).strip().splitlines() or [""])[0]  # transformers appends a multi-line load report
        raise LoadError(f"cannot load the model in {directory} ({type(error).__name__}: {problem}): its config.json "
                        "or weights file is missing, damaged or from another model; restore them from a copy of the "
                        "directory, or save the model again") from None
    if info["missing_keys"]:
        raise LoadError(f"the weights in {directory} lack {len(info['missing_keys'])} tensors of the model its config.json "
                        f"describes (e.g. {sorted(info['missing_keys'])[0]}): config.json and the weights are from "
                        "different models; restore them from a copy of the directory, or save the model again")
    return model


def _check_matches_dense(directory: Path, name: str, layer: POETLinear, dense: torch.Tensor) -> None:
    """The dense weight stored in `directory` must be the one the loaded POET state computes.

    They differ when a plain save (model.save_pretrained, a Trainer checkpoint) replaced the weights after
    a poetlm save and left its stale poetlm files, or when poetlm_config.json was edited. Both sides are
    rounded to the saved dtype, so one unit in its last place (plus fp32 noise near zero) is allowed.
    """
    with torch.no_grad():
        computed, dense = layer.weight.float(), dense.float()
        tolerance = torch.finfo(layer.weight_dtype).eps * dense.abs() + 1e-5 * dense.abs().max()
        worst = ((computed - dense).abs() - tolerance).max()
    if worst > 0:
        raise LoadError(f"{directory}: the POET state in {STATE_NAME} does not compute the dense weight of layer {name!r} "
                        f"stored beside it: the poetlm files are stale (a plain save, e.g. model.save_pretrained or a "
                        f"Trainer checkpoint, replaced the weights after poetlm.save_pretrained) or {CONFIG_NAME} was "
                        "edited. Load the newer dense model with transformers' from_pretrained, or save the POET model "
                        "again with poetlm.save_pretrained")


def dtype_argument(dtype) -> dict:
    """transformers' `from_pretrained` / `from_config` keyword for the weights' dtype: `dtype` from 4.56 on (later
    versions log a deprecation for the old name), `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def from_pretrained(directory, **kwargs) -> nn.Module:
    """Rebuild the POET model that `save_pretrained(model, directory)` wrote, exactly.

    Keyword arguments go to transformers' `from_pretrained` (e.g. device_map); the dtype is the saved one.
    """
    import transformers

    directory = Path(directory)
    info = _read_info(directory)
    state = _read_state(directory)
    model_class = getattr(transformers, info["architecture"], None) or transformers.AutoModelForCausalLM
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:  # the dense weights' own dtype, as the model was saved
        kwargs.update(dtype_argument("auto"))
    model = load_dense(model_class, directory, **kwargs)
    for name, entry in info["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LoadError(f"{directory}: layer {name!r} recorded in {CONFIG_NAME} is not in the "
                            f"{type(model).__name__} built from config.json; the directory is inconsistent") from None
        # W0 comes from the saved state below; wrapping with init="keep" avoids drawing a random one first.
        layer = wrap_module(module, POETConfig.from_dict({**entry["config"].to_dict(), "init": "keep"}), name)
        layer.config = entry["config"]
        layer.seed_key = entry.get("seed_key", layer.seed_key)  # older saves: seeded by name
        prefix = name + "."
        local = {key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)}
        if layer.bias is not None:
            local["bias"] = layer.bias
        try:
            missing, unexpected = layer.load_state_dict(local, strict=False)
        except RuntimeError as error:  # shapes that do not fit, coordinates that are not a permutation
            raise LoadError(f"{directory}: the saved state of layer {name!r} does not fit it ({error}); save the model "
                            "again with poetlm.save_pretrained") from None
        if missing or unexpected or (layer.in_features, layer.out_features) != (entry["in_features"], entry["out_features"]):
            raise LoadError(f"{directory}: the saved state of layer {name!r} does not fit it (missing {missing}, "
                            f"unexpected {unexpected}); save the model again with poetlm.save_pretrained")
        _check_matches_dense(directory, name, layer, module.weight)
        model = replace_module(model, name, layer)
    trainable = set(info["trainable"])
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model
