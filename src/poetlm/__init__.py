"""poetlm: train and finetune language models with POET (orthogonal equivalence transformation).

The math lives in `orthogonal` (Cayley / Cayley–Neumann maps, skew orthogonalization) and `primitives`
(block- and fully-stochastic rotations); POET comes in two forms: `optim.POET`, an optimizer that rotates
plain weights every step with an update rule from `update_rules` (the default), and the paper's
reparameterized layer `layer.POETLinear` with periodic merges. Model-level operations are in `model`, the
training application in `poetlm.train`.
"""

from .adapter import AdapterError, MergeHistory, base_fingerprint, load_adapter, save_adapter
from .config import POETConfig, POETWarning
from .diagnostics import layer_diagnostics, model_diagnostics, svd_entropy
from .layer import POETConv1D, POETLinear
from .model import (coverage, export_dense, merge, param_groups, poet_layers, poetize, rotation_parameters,
                    rotated_weights, step_weight_cache, unpoetize)
from .optim import POET
from .serialization import LoadError, from_pretrained, save_pretrained
from .tuner import POETModel, get_poet_model
from .update_rules import KeepState, ResetState, RuleConfig

__version__ = "0.1.0"

__all__ = [
    "POET", "RuleConfig", "rotated_weights", "POETConfig", "POETLinear", "POETConv1D", "poetize", "coverage", "merge", "export_dense", "unpoetize",
    "param_groups", "poet_layers", "save_pretrained", "from_pretrained", "LoadError",
    "get_poet_model", "POETModel",
    "rotation_parameters", "step_weight_cache", "layer_diagnostics", "model_diagnostics", "svd_entropy",
    "ResetState", "KeepState", "MergeHistory", "save_adapter", "load_adapter", "base_fingerprint", "AdapterError",
    "POETWarning",
]
