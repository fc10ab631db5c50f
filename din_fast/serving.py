"""Serving latency: one request scores ``C`` candidates for one user with the whole model
(embeddings, attention against the user's history, top MLP), as ``model.score_candidates``."""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import torch

from .data.batching import Vocabulary
from .models import DIN, BaseModel

# Table sizes of Amazon Electronics after the authors' preprocessing.
AMAZON_VOCABULARY = Vocabulary(item_rows=63001 + 1, category_rows=801 + 1, profile_names=("user_id",),
                               profile_rows=(192403 + 1,))


def random_requests(vocabulary: Vocabulary, history_length: int, num_candidates: int, count: int,
                    device, seed: int = 0):
    """``count`` random requests ``(user [F], history [T, 2], candidates [C, 2])`` on ``device``."""
    generator = torch.Generator().manual_seed(seed)

    def ids(rows: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, rows, shape, generator=generator)

    requests = []
    for _ in range(count):
        user = torch.stack([ids(rows, 1)[0] for rows in vocabulary.profile_rows]) if vocabulary.profile_rows \
            else torch.zeros(0, dtype=torch.int64)
        history = torch.stack([ids(vocabulary.item_rows, history_length),
                               ids(vocabulary.category_rows, history_length)], dim=1)
        candidates = torch.stack([ids(vocabulary.item_rows, num_candidates),
                                  ids(vocabulary.category_rows, num_candidates)], dim=1)
        requests.append((user.to(device), history.to(device), candidates.to(device)))
    return requests


def measure_latency(model, requests, iterations: int = 200, warmup: int = 20) -> Dict[str, float]:
    """Milliseconds per ``model.score_candidates`` request (eval mode, inference mode): p50, p90,
    p99, mean. CUDA work is synchronized before each clock read."""
    model.eval()
    device = next(model.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iterations):
            user, history, candidates = requests[i % len(requests)]
            synchronize()
            start = time.perf_counter()
            model.score_candidates(user, history, candidates)
            synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    values = np.asarray(times)
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean()), "iterations": iterations}


def serving_model(model_name: str = "din", dice: bool = False, backend: str = "auto",
                  vocabulary: Optional[Vocabulary] = None, seed: int = 0):
    """An untrained model of the paper's shape (Amazon table sizes by default); its weights do
    not change the latency."""
    torch.manual_seed(seed)
    model_class = DIN if model_name == "din" else BaseModel
    return model_class(vocabulary or AMAZON_VOCABULARY, mlp_activation="dice" if dice else "prelu",
                       backend=backend).eval()
