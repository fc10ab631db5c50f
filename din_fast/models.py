"""The paper's models: ``DIN`` and ``BaseModel`` (Embedding & MLP with sum pooling).

Both embed the user profile features, the candidate (item, category) and the behaviour sequence
of (item, category) pairs; item and category embeddings are concatenated, so ``D = 2 *
embedding_dim`` (the paper: 2 x 18 = 36). ``DIN`` pools the behaviours with the local activation
unit (``din_fast.AttentionPooling``), ``BaseModel`` sums them. The concatenation of profile,
candidate and pooled behaviours goes through the top MLP (the paper: 200, 80, PReLU or Dice) to
one logit; the loss is the log loss (eq. 2) plus, optionally, the mini-batch aware penalty on
every embedding table (eq. 5-7). Id 0 is padding everywhere. Every din_fast module gets the
model's ``backend``. Data-parallel training: see ``din_fast.distributed``.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data.batching import PADDING_ID, Batch, Vocabulary
from .modules import AttentionPooling, Dice, MBARegularizer

Tensor = torch.Tensor

MLP_ACTIVATIONS = ("prelu", "dice")
# Small initial embeddings keep the unnormalized attention sums and the summed behaviours of
# long histories in the range where the MLPs' activations are not saturated.
EMBEDDING_INIT_STD = 0.05


def _counts_tensor(counts: Optional[Mapping[str, np.ndarray]], name: str, rows: int) -> Tensor:
    if counts is None or name not in counts:
        raise ValueError(f"mba_lambda > 0 needs feature_counts[{name!r}] (n_j for each of its {rows} rows); "
                         f"see din_fast.data.feature_counts")
    values = torch.as_tensor(np.asarray(counts[name]), dtype=torch.float32)
    if values.shape != (rows,):
        raise ValueError(f"feature_counts[{name!r}] must have shape [{rows}], got {tuple(values.shape)}")
    return values


class _InterestModel(nn.Module):
    """Embeddings, top MLP, loss and MBA penalty shared by ``DIN`` and ``BaseModel``; subclasses
    define how the behaviours are pooled."""

    model_name = ""

    def __init__(self, vocabulary: Union[Vocabulary, dict], embedding_dim: int = 18,
                 mlp_hidden: Sequence[int] = (200, 80), mlp_activation: str = "prelu", mba_lambda: float = 0.0,
                 feature_counts: Optional[Mapping[str, np.ndarray]] = None, backend: str = "auto"):
        super().__init__()
        if isinstance(vocabulary, dict):
            vocabulary = Vocabulary.from_dict(vocabulary)
        if mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {list(MLP_ACTIVATIONS)}, got {mlp_activation!r}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if mba_lambda < 0:
            raise ValueError(f"mba_lambda must be >= 0, got {mba_lambda}")
        self.vocabulary = vocabulary
        self.embedding_dim = embedding_dim
        self.behaviour_dim = 2 * embedding_dim
        self.backend = backend
        self.mba_lambda = float(mba_lambda)
        self.config = dict(model=self.model_name, vocabulary=vocabulary.to_dict(), embedding_dim=embedding_dim,
                           mlp_hidden=list(mlp_hidden), mlp_activation=mlp_activation, mba_lambda=self.mba_lambda,
                           backend=backend)

        def table(rows: int) -> nn.Embedding:
            embedding = nn.Embedding(rows, embedding_dim, padding_idx=PADDING_ID)
            with torch.no_grad():
                embedding.weight.normal_(0.0, EMBEDDING_INIT_STD)
                embedding.weight[PADDING_ID].zero_()
            return embedding

        self.item_embedding = table(vocabulary.item_rows)
        self.category_embedding = table(vocabulary.category_rows)
        self.profile_embeddings = nn.ModuleList(table(rows) for rows in vocabulary.profile_rows)

        layers = []
        width = embedding_dim * len(vocabulary.profile_rows) + 2 * self.behaviour_dim
        for hidden in mlp_hidden:
            layers.append(nn.Linear(width, hidden))
            layers.append(nn.PReLU(hidden) if mlp_activation == "prelu" else Dice(hidden, backend=backend))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

        # The ranks whose ids the training penalty unites; None: torch.distributed's default
        # group when it is initialized with more than one rank (see mba_penalty).
        self.mba_process_group = None
        self.regularizers = nn.ModuleDict()
        if self.mba_lambda > 0:
            for name, embedding in self.embedding_tables().items():
                counts = _counts_tensor(feature_counts, name, embedding.num_embeddings)
                self.regularizers[name] = MBARegularizer(counts, self.mba_lambda, backend=backend)

    # -- pieces -----------------------------------------------------------------------------------

    def embedding_tables(self) -> Dict[str, nn.Embedding]:
        """The embedding tables by feature name (``item``, ``category``, then the profile names)."""
        tables = {"item": self.item_embedding, "category": self.category_embedding}
        tables.update(zip(self.vocabulary.profile_names, self.profile_embeddings))
        return tables

    def embed_behaviours(self, items: Tensor, categories: Tensor) -> Tensor:
        """``[...]`` item and category ids -> ``[..., D]`` concatenated embeddings."""
        return torch.cat([self.item_embedding(items), self.category_embedding(categories)], dim=-1)

    def embed_profile(self, profile: Tensor) -> Tensor:
        """``[B, F]`` profile ids -> ``[B, F * embedding_dim]``."""
        parts = [embedding(profile[:, i]) for i, embedding in enumerate(self.profile_embeddings)]
        if not parts:
            return self.item_embedding.weight.new_zeros((profile.shape[0], 0))
        return torch.cat(parts, dim=-1)

    def pool(self, query: Tensor, keys: Tensor, lengths: Tensor) -> Tensor:
        """query ``[B, D]``, keys ``[B, T, D]``, lengths ``[B]`` -> ``[B, D]``."""
        raise NotImplementedError

    def pool_candidates(self, history: Tensor, candidates: Tensor,
                        return_attention: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Serving: history ``[T, D]`` (all valid), candidates ``[C, D]`` -> ``([C, D], [C, T] or None)``."""
        raise NotImplementedError

    def top(self, profile: Tensor, query: Tensor, pooled: Tensor) -> Tensor:
        """The top MLP: ``[B, F*E]``, ``[B, D]``, ``[B, D]`` -> logits ``[B]``."""
        return self.mlp(torch.cat([profile, query, pooled], dim=-1)).squeeze(-1)

    # -- training ---------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> Tensor:
        """Click logits ``[B]`` of a padded ``Batch`` (see ``din_fast.data``)."""
        query = self.embed_behaviours(batch.items, batch.categories)
        keys = self.embed_behaviours(batch.history_items, batch.history_categories)
        pooled = self.pool(query, keys, batch.lengths)
        return self.top(self.embed_profile(batch.profile), query, pooled)

    def mba_penalty(self, batch: Batch) -> Tensor:
        """The mini-batch aware penalty (eq. 5) of every embedding table over the ids this batch
        looks up; 0 when ``mba_lambda`` is 0.

        In training mode in a distributed run (``mba_process_group``, or torch.distributed's
        default group with more than one rank) the ids are the union over the ranks' batches,
        the global mini-batch of eq. 5: every rank must then call this in the same step. Every
        rank adds the whole union's penalty: DDP averages the ranks' gradients, so the average
        holds ``lam * w_j / n_j`` once on each row the global batch touches, as one process
        training on the global batch has it.
        """
        if not self.regularizers:
            return self.item_embedding.weight.new_zeros(())
        ids = {"item": torch.cat([batch.items, batch.history_items.reshape(-1)]),
               "category": torch.cat([batch.categories, batch.history_categories.reshape(-1)])}
        ids.update((name, batch.profile[:, i]) for i, name in enumerate(self.vocabulary.profile_names))
        tables = self.embedding_tables()
        group = self._mba_group()
        if group is not None:
            names = list(self.regularizers)
            united = distributed.union_table_ids([ids[name] for name in names],
                                                 [tables[name].num_embeddings for name in names], group)
            ids = dict(zip(names, united))
        return sum(regularizer.penalty(tables[name].weight, ids[name])
                   for name, regularizer in self.regularizers.items())

    def _mba_group(self):
        if not self.training:
            return None
        return self.mba_process_group if self.mba_process_group is not None else distributed.default_group()

    def loss(self, batch: Batch, include_mba: bool = True, log_loss_scale: float = 1.0) -> Tuple[Tensor, Tensor]:
        """``(log loss + MBA penalty, logits [B])``; ``include_mba=False`` leaves the penalty to an
        optimizer that applies eq. 7 itself. ``log_loss_scale`` multiplies the log loss alone
        (data-parallel training weights unequal shards with it; see
        ``din_fast.distributed.shard_weight``)."""
        logits = self(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels.to(logits.dtype))
        if log_loss_scale != 1.0:
            loss = loss * log_loss_scale
        if include_mba and self.regularizers:
            loss = loss + self.mba_penalty(batch)
        return loss, logits

    # -- serving ----------------------------------------------------------------------------------

    def score_candidates(self, user: Tensor, history: Tensor, candidates: Tensor,
                         return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Optional[Tensor]]]:
        """Click probabilities of ``C`` candidates for one user, inference semantics (call
        ``eval()`` first). The history is embedded once for all candidates.

        Args:
            user: ``[F]`` int64 profile ids.
            history: ``[T, 2]`` int64 (item, category) behaviours, oldest first, no padding.
            candidates: ``[C, 2]`` int64 (item, category).
            return_attention: also return the attention weights ``[C, T]`` (``None`` for
                ``BaseModel``).

        Returns:
            ``[C]`` probabilities (and the weights).
        """
        if self.training:
            raise RuntimeError("score_candidates has inference semantics: call model.eval() first")
        if user.dim() != 1 or user.shape[0] != len(self.profile_embeddings):
            raise ValueError(f"user must have shape [{len(self.profile_embeddings)}] (one id per profile feature), "
                             f"got {tuple(user.shape)}")
        for name, value in (("history", history), ("candidates", candidates)):
            if value.dim() != 2 or value.shape[1] != 2:
                raise ValueError(f"{name} must have shape [N, 2] of (item, category) ids, got {tuple(value.shape)}")
        keys = self.embed_behaviours(history[:, 0], history[:, 1])
        query = self.embed_behaviours(candidates[:, 0], candidates[:, 1])
        pooled, weights = self.pool_candidates(keys, query, return_attention)
        profile = self.embed_profile(user[None]).expand(query.shape[0], -1)
        probabilities = torch.sigmoid(self.top(profile, query, pooled))
        return (probabilities, weights) if return_attention else probabilities


class DIN(_InterestModel):
    """Deep Interest Network: attention pooling of the behaviours against the candidate.

    Args:
        vocabulary: table sizes (``din_fast.data.Vocabulary`` or its ``to_dict()``).
        embedding_dim: per id; behaviours and candidates have ``D = 2 * embedding_dim``.
        mlp_hidden, mlp_activation: the top MLP (``"prelu"`` or ``"dice"``).
        attention_hidden, attention_activation, attention_normalization, softmax_scale,
            dice_stats: of ``din_fast.AttentionPooling``.
        mba_lambda: MBA strength (0: off); needs ``feature_counts`` (``din_fast.data.feature_counts``).
        backend: for every din_fast module.

    Shape:
        ``forward(batch)`` -> logits ``[B]``.
    """

    model_name = "din"

    def __init__(self, vocabulary: Union[Vocabulary, dict], embedding_dim: int = 18,
                 mlp_hidden: Sequence[int] = (200, 80), mlp_activation: str = "prelu",
                 attention_hidden: Sequence[int] = (80, 40), attention_activation: str = "sigmoid",
                 attention_normalization: str = "none", softmax_scale: float = 1.0, dice_stats: str = "valid",
                 mba_lambda: float = 0.0, feature_counts: Optional[Mapping[str, np.ndarray]] = None,
                 backend: str = "auto"):
        super().__init__(vocabulary, embedding_dim, mlp_hidden, mlp_activation, mba_lambda, feature_counts, backend)
        self.attention = AttentionPooling(self.behaviour_dim, tuple(attention_hidden), attention_activation,
                                          attention_normalization, softmax_scale, dice_stats, backend=backend)
        self.config.update(attention_hidden=list(attention_hidden), attention_activation=attention_activation,
                           attention_normalization=attention_normalization, softmax_scale=softmax_scale,
                           dice_stats=dice_stats)

    def pool(self, query: Tensor, keys: Tensor, lengths: Tensor) -> Tensor:
        return self.attention(query, keys, lengths=lengths)

    def attention_weights(self, batch: Batch) -> Tensor:
        """The attention weights ``[B, T]`` of a batch (0 on padding)."""
        query = self.embed_behaviours(batch.items, batch.categories)
        keys = self.embed_behaviours(batch.history_items, batch.history_categories)
        return self.attention(query, keys, lengths=batch.lengths, return_scores=True)[1]

    def pool_candidates(self, history: Tensor, candidates: Tensor,
                        return_attention: bool) -> Tuple[Tensor, Optional[Tensor]]:
        if history.shape[0] == 0:
            return candidates.new_zeros(candidates.shape), candidates.new_zeros((candidates.shape[0], 0))
        pooled, weights = self.attention.score_candidates(history, candidates, return_scores=True)
        return pooled, weights


class BaseModel(_InterestModel):
    """The paper's BaseModel (Embedding & MLP): the behaviours are summed (sum pooling over the
    valid positions). Arguments as ``DIN`` without the attention ones."""

    model_name = "base"

    def pool(self, query: Tensor, keys: Tensor, lengths: Tensor) -> Tensor:
        valid = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths[:, None]
        return (keys * valid[..., None].to(keys.dtype)).sum(dim=1)

    def pool_candidates(self, history: Tensor, candidates: Tensor,
                        return_attention: bool) -> Tuple[Tensor, Optional[Tensor]]:
        return history.sum(dim=0, keepdim=True).expand(candidates.shape[0], -1), None


MODELS = {"din": DIN, "base": BaseModel}


def build_model(config: dict, feature_counts: Optional[Mapping[str, np.ndarray]] = None) -> _InterestModel:
    """A model from its ``config`` (``model.config``: ``{"model": "din" | "base", ...}``)."""
    options = dict(config)
    name = options.pop("model")
    if name not in MODELS:
        raise ValueError(f"config['model'] must be one of {list(MODELS)}, got {name!r}")
    return MODELS[name](feature_counts=feature_counts, **options)


def load_checkpoint(path, map_location="cpu", backend: Optional[str] = None) -> _InterestModel:
    """Rebuilds a model saved by ``din-fast train`` (``{"config", "state_dict"}``), in eval mode;
    ``backend`` replaces the one it was trained with (a triton-trained model served on a CPU)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    config = dict(checkpoint["config"])
    if backend is not None:
        config["backend"] = backend
    if config.get("mba_lambda", 0.0) > 0:
        # The penalty's counts are in the state_dict; placeholders of the right size get overwritten.
        vocabulary = Vocabulary.from_dict(config["vocabulary"])
        rows = {"item": vocabulary.item_rows, "category": vocabulary.category_rows}
        rows.update(zip(vocabulary.profile_names, vocabulary.profile_rows))
        placeholders = {name: np.ones(n) for name, n in rows.items()}
    else:
        placeholders = None
    model = build_model(config, placeholders)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
