"""Data sets for DIN: a synthetic one with planted interests, Amazon Electronics and MovieLens 20M
(read from local files, never downloaded), padding batches and feature frequencies."""

from .amazon import load_amazon
from .batching import (PADDING_ID, Batch, InteractionData, Samples, Vocabulary, feature_counts, iterate_batches,
                       make_batch, num_batches)
from .movielens import load_movielens
from .synthetic import make_synthetic

__all__ = [
    "PADDING_ID",
    "Batch",
    "InteractionData",
    "Samples",
    "Vocabulary",
    "feature_counts",
    "iterate_batches",
    "load_amazon",
    "load_movielens",
    "make_batch",
    "make_synthetic",
    "num_batches",
]
