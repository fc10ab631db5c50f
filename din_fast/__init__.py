"""din_fast: fused Deep Interest Network (DIN) ops for PyTorch."""

from .backend import BACKENDS, resolve_backend
from .functional import attention_pooling, dice, local_activation_scores, mba_penalty, score_candidates
from .modules import AttentionPooling, Dice, LocalActivationUnit, MBARegularizer

__version__ = "0.1.0"

__all__ = [
    "AttentionPooling",
    "Dice",
    "LocalActivationUnit",
    "MBARegularizer",
    "BACKENDS",
    "resolve_backend",
    "attention_pooling",
    "dice",
    "local_activation_scores",
    "mba_penalty",
    "score_candidates",
]
