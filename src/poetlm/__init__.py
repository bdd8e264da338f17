"""poetlm: train and finetune language models with POET (orthogonal equivalence transformation).

The math lives in `orthogonal` (Cayley / Cayley–Neumann maps) and `primitives` (block- and
fully-stochastic rotations), the layer in `layer`, model-level operations in `model`, and the
training application in `poetlm.train`.
"""

from .adapter import AdapterError, MergeHistory, base_fingerprint, load_adapter, save_adapter
from .config import POETConfig
from .diagnostics import layer_diagnostics, model_diagnostics, svd_entropy
from .layer import POETConv1D, POETLinear
from .model import (coverage, export_dense, merge, param_groups, poet_layers, poetize, rotation_parameters,
                    step_weight_cache, unpoetize)
from .serialization import LoadError, from_pretrained, save_pretrained
from .tuner import POETModel, get_poet_model
from .update_rules import KeepState, ResetState

__version__ = "0.1.0"

__all__ = [
    "POETConfig", "POETLinear", "POETConv1D", "poetize", "coverage", "merge", "export_dense", "unpoetize",
    "param_groups", "poet_layers", "save_pretrained", "from_pretrained", "LoadError",
    "get_poet_model", "POETModel",
    "rotation_parameters", "step_weight_cache", "layer_diagnostics", "model_diagnostics", "svd_entropy",
    "ResetState", "KeepState", "MergeHistory", "save_adapter", "load_adapter", "base_fingerprint", "AdapterError",
]
