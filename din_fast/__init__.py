"""din_fast: fused Deep Interest Network (DIN) ops for PyTorch."""

from .backend import BACKENDS, resolve_backend
from .functional import attention_pooling, dice, local_activation_scores, mba_penalty, score_candidates
from .frequency import FeatureCounter, count_features
from .models import DIN, BaseModel
from .modules import AttentionPooling, Dice, LocalActivationUnit, MBARegularizer
from .optim import MBASGD, mba_sgd_fused_, mba_sgd_step_

__version__ = "0.1.0"

__all__ = [
    "DIN",
    "BaseModel",
    "AttentionPooling",
    "Dice",
    "LocalActivationUnit",
    "MBARegularizer",
    "MBASGD",
    "FeatureCounter",
    "count_features",
    "mba_sgd_step_",
    "mba_sgd_fused_",
    "BACKENDS",
    "resolve_backend",
    "attention_pooling",
    "dice",
    "local_activation_scores",
    "mba_penalty",
    "score_candidates",
]
