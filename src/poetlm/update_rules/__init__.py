"""Rules that turn the rotations' gradients into rotation steps.

Two forms share them:
- the reparameterized (layer) form of the paper: torch's AdamW steps the packed skew parameters and a
  `MergeRule` decides what a merge does to its state (`merge_state`);
- the fold-every-step form (`poetlm.optim.POET`): a `RotationRule` maps each block's skew gradient and
  its own state to a step direction; the rotation exp(θ·direction) is folded into the weight at once.
  `lie_adam`: Adam moments kept in the Lie algebra across folds; `orthogonalized`: momentum whose every
  rotation plane turns by the same angle (Muon on so(b)).
"""

from .base import RULES, RotationRule, RuleConfig, make_rule
from .lie_adam import LieAdam
from .merge_state import KeepState, MergeRule, ResetState
from .orthogonalized import Orthogonalized

__all__ = ["RULES", "RotationRule", "RuleConfig", "make_rule", "LieAdam", "Orthogonalized", "MergeRule", "ResetState",
           "KeepState"]
