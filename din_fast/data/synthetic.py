"""A synthetic data set with planted interests, where attention should beat sum pooling.

Each category has a centre in a small latent space and each item a vector near its category's
centre. Each user holds a few interest categories; most behaviours are drawn from them (item
popularity within a category is Zipf-like), the rest at random. A candidate is clicked with
probability ``sigmoid(sharpness * (max_t cos(v_candidate, v_t) - threshold) + segment bias)``:
the click depends on how close the candidate is to *some* past behaviour, which a local
activation unit can find directly, while a sum of all behaviours blurs the interests together.
Each user's last ``test_candidates`` impressions, scored against the whole history, form the
test split; earlier impressions, scored against the history before them, the training split.
Everything is drawn from one seeded generator, so a seed gives the same data set everywhere.
"""

from __future__ import annotations

import numpy as np

from .batching import InteractionData, Samples, Vocabulary


def make_synthetic(num_users: int = 10000, num_items: int = 2000, num_categories: int = 50, *,
                   interests_per_user: tuple = (2, 4), history_length: tuple = (5, 40),
                   train_candidates: int = 8, test_candidates: int = 4, latent_dim: int = 8,
                   item_spread: float = 0.45, off_interest_rate: float = 0.15, interest_candidate_rate: float = 0.5,
                   sharpness: float = 7.0, threshold: float = 0.75, num_segments: int = 4,
                   seed: int = 0) -> InteractionData:
    """Draws the data set.

    Args:
        num_users, num_items, num_categories: vocabulary sizes (ids start at 1).
        interests_per_user: inclusive range of interest categories per user.
        history_length: inclusive range of each user's number of behaviours.
        train_candidates: training impressions per user, each scored against a random prefix of
            the history (at least 1 behaviour).
        test_candidates: test impressions per user, scored against the whole history.
        latent_dim, item_spread: latent space size and how far items lie from their category's
            centre.
        off_interest_rate: share of behaviours outside the user's interests.
        interest_candidate_rate: share of candidates drawn from the user's interests.
        sharpness, threshold: of the click probability (see the module docstring).
        num_segments: values of the ``segment`` profile feature, which shifts the click rate.
        seed: the generator's seed.
    """
    if num_items < num_categories:
        raise ValueError(f"num_items ({num_items}) must be >= num_categories ({num_categories})")
    if history_length[0] < 2:
        raise ValueError(f"history_length must start at >= 2, got {history_length}")
    rng = np.random.default_rng(seed)

    centres = rng.standard_normal((num_categories, latent_dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Every category gets at least one item; ids of one category are contiguous.
    item_category = np.sort(np.concatenate([np.arange(num_categories),
                                            rng.integers(0, num_categories, num_items - num_categories)]))
    vectors = centres[item_category] + item_spread * rng.standard_normal((num_items, latent_dim)) / np.sqrt(latent_dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    category_start = np.searchsorted(item_category, np.arange(num_categories))
    category_size = np.bincount(item_category, minlength=num_categories)

    def draw_items(categories: np.ndarray) -> np.ndarray:
        # Zipf-like popularity inside a category: rank = floor(size * u^2).
        rank = np.floor(category_size[categories] * rng.random(categories.shape) ** 2).astype(np.int64)
        return category_start[categories] + rank

    # Users: interests, behaviour sequences.
    n_interests = rng.integers(interests_per_user[0], interests_per_user[1] + 1, num_users)
    interests = np.argsort(rng.random((num_users, num_categories)), axis=1)[:, :interests_per_user[1]]
    lengths = rng.integers(history_length[0], history_length[1] + 1, num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owner = np.repeat(np.arange(num_users), lengths)

    def interest_of(users: np.ndarray) -> np.ndarray:
        pick = np.floor(rng.random(users.shape) * n_interests[users]).astype(np.int64)
        return interests[users, pick]

    behaviour_categories = np.where(rng.random(owner.shape) < off_interest_rate,
                                    rng.integers(0, num_categories, owner.shape), interest_of(owner))
    behaviour_items = draw_items(behaviour_categories)

    segment = rng.integers(0, num_segments, num_users)
    segment_bias = np.linspace(-0.6, 0.6, num_segments)

    def impressions(per_user: int, full_history: bool) -> Samples:
        users = np.repeat(np.arange(num_users), per_user)
        if full_history:
            ends = lengths[users]
        else:
            ends = 1 + np.floor(rng.random(users.shape) * (lengths[users] - 1)).astype(np.int64)
        categories = np.where(rng.random(users.shape) < interest_candidate_rate, interest_of(users),
                              rng.integers(0, num_categories, users.shape))
        items = draw_items(categories)
        # Max cosine similarity with the behaviours before the impression.
        steps = np.arange(history_length[1])
        valid = steps[None, :] < ends[:, None]
        positions = np.where(valid, offsets[users][:, None] + steps[None, :], 0)
        similarity = np.einsum("nd,ntd->nt", vectors[items], vectors[behaviour_items[positions]])
        best = np.where(valid, similarity, -np.inf).max(axis=1)
        logits = sharpness * (best - threshold) + segment_bias[segment[users]]
        labels = (rng.random(users.shape) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return Samples(users=users.astype(np.int64), history_end=ends.astype(np.int64), items=items + 1,
                       categories=categories.astype(np.int64) + 1, labels=labels)

    train = impressions(train_candidates, full_history=False)
    test = impressions(test_candidates, full_history=True)
    user_profile = (segment + 1).astype(np.int64)[:, None]
    return InteractionData(
        name=f"synthetic(seed={seed})",
        sequence_items=behaviour_items.astype(np.int64) + 1,
        sequence_categories=behaviour_categories.astype(np.int64) + 1,
        sequence_offsets=offsets,
        user_profile=user_profile,
        item_categories=np.concatenate([[0], item_category + 1]).astype(np.int64),
        vocabulary=Vocabulary(item_rows=num_items + 1, category_rows=num_categories + 1,
                              profile_names=("segment",), profile_rows=(num_segments + 1,)),
        train=train,
        test=test,
    )
