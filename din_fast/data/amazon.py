"""Amazon Electronics (the paper's Amazon data set), read from the local files
``reviews_Electronics_5.json`` and ``meta_Electronics.json`` (plain or ``.gz``).

Preprocessing follows the authors' released scripts: each user's reviews sorted by time are the
behaviours; for every position ``i >= 1`` the reviewed item is a positive with the first ``i``
reviews as history and a random item the user never reviewed is a negative; the last position
is held out for the test split. An item's category is the last entry of its last category
path in the meta file. User, item and category ids are assigned in sorted key order (1-based,
0 is padding). The meta file of the original distribution holds one Python dict literal per
line rather than JSON; both are read.
"""

from __future__ import annotations

import ast
import json
from array import array
from pathlib import Path
from typing import Dict

import numpy as np

from ._files import DataFileError, locate, read_lines
from .batching import InteractionData, Samples, Vocabulary

REVIEWS_FILE = "reviews_Electronics_5.json"
META_FILE = "meta_Electronics.json"
SOURCE = ("the Amazon product data (McAuley et al.: jmcauley.ucsd.edu/data/amazon, 'Electronics' 5-core reviews "
          "and metadata)")
UNKNOWN_CATEGORY = "<unknown>"


def _parse_record(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataFileError(path, number, "neither a JSON object nor a Python dict literal") from None
    if not isinstance(record, dict):
        raise DataFileError(path, number, f"expected an object, got {type(record).__name__}")
    return record


def _field(record: dict, key: str, path: Path, number: int):
    if key not in record:
        raise DataFileError(path, number, f"missing field {key!r}")
    return record[key]


def _intern(keys: Dict[str, int], key: str) -> int:
    index = keys.get(key)
    if index is None:
        index = keys[key] = len(keys)
    return index


def _sorted_ids(keys: Dict[str, int]) -> np.ndarray:
    """1-based id of each interned key (indexed by intern order), in sorted key order."""
    ids = np.empty(len(keys), dtype=np.int64)
    for rank, key in enumerate(sorted(keys)):
        ids[keys[key]] = rank + 1
    return ids


def load_amazon(directory, seed: int = 0) -> InteractionData:
    """Reads and preprocesses Amazon Electronics from ``directory``.

    Args:
        directory: folder holding ``reviews_Electronics_5.json`` and ``meta_Electronics.json``.
        seed: seed of the negative sampling.

    Raises:
        FileNotFoundError: a file is missing (the message says which and where they come from).
        DataFileError (a ValueError): a malformed line, with its file and line number.
    """
    reviews_path, meta_path = locate(directory, (REVIEWS_FILE, META_FILE), "Amazon Electronics", SOURCE)

    user_keys: Dict[str, int] = {}
    item_keys: Dict[str, int] = {}
    users, items, times = array("q"), array("q"), array("q")
    for number, line in read_lines(reviews_path, REVIEWS_FILE):
        if not line.strip():
            continue
        record = _parse_record(reviews_path, number, line)
        user = _field(record, "reviewerID", reviews_path, number)
        item = _field(record, "asin", reviews_path, number)
        time = _field(record, "unixReviewTime", reviews_path, number)
        if not isinstance(user, str) or not isinstance(item, str):
            raise DataFileError(reviews_path, number, "reviewerID and asin must be strings")
        try:
            times.append(int(time))
        except (TypeError, ValueError, OverflowError):  # OverflowError: infinity, or beyond 64 bits
            raise DataFileError(reviews_path, number, f"unixReviewTime must be an integer within 64 bits, "
                                                      f"got {time!r}") from None
        users.append(_intern(user_keys, user))
        items.append(_intern(item_keys, item))
    if not users:
        raise DataFileError(reviews_path, 1, "no reviews in the file")

    category_keys: Dict[str, int] = {}
    item_category = np.full(len(item_keys), -1, dtype=np.int64)
    for number, line in read_lines(meta_path, META_FILE):
        if not line.strip():
            continue
        record = _parse_record(meta_path, number, line)
        asin = _field(record, "asin", meta_path, number)
        if not isinstance(asin, str):
            raise DataFileError(meta_path, number, f"asin must be a string, got {asin!r}")
        item = item_keys.get(asin)
        if item is None:
            continue
        paths = record.get("categories") or []
        if not (isinstance(paths, list) and all(isinstance(category_path, list) for category_path in paths)):
            raise DataFileError(meta_path, number, f"categories must be a list of category paths (lists), "
                                                   f"got {paths!r}")
        category = str(paths[-1][-1]) if paths and paths[-1] else UNKNOWN_CATEGORY
        item_category[item] = _intern(category_keys, category)
    if (item_category < 0).any():
        unknown = _intern(category_keys, UNKNOWN_CATEGORY)
        item_category[item_category < 0] = unknown

    user_ids = _sorted_ids(user_keys)[np.frombuffer(users, dtype=np.int64)]
    item_ids = _sorted_ids(item_keys)[np.frombuffer(items, dtype=np.int64)]
    category_of_item = np.zeros(len(item_keys) + 1, dtype=np.int64)
    category_of_item[_sorted_ids(item_keys)] = _sorted_ids(category_keys)[item_category]
    return build_next_item_data(user_ids - 1, item_ids, np.frombuffer(times, dtype=np.int64), category_of_item,
                                num_users=len(user_keys), name="amazon-electronics", seed=seed)


def build_next_item_data(users: np.ndarray, items: np.ndarray, times: np.ndarray, item_categories: np.ndarray,
                         num_users: int, name: str, seed: int) -> InteractionData:
    """The authors' next-item samples from events ``(user index, item id, time)``.

    Each user's events sorted by (time, input order) are the behaviours. Position ``i`` in
    ``1 .. L-2`` gives a training positive (item ``i``, history ``0 .. i-1``) and a negative (a
    random item the user never had) with the same history; position ``L - 1`` gives the test pair.
    """
    num_items = item_categories.shape[0] - 1
    order = np.lexsort((np.arange(users.shape[0]), times, users))
    users, items = users[order], items[order]
    lengths = np.bincount(users, minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    position = np.arange(users.shape[0], dtype=np.int64) - offsets[users]
    length = lengths[users]

    rng = np.random.default_rng(seed)
    negatives = rng.integers(1, num_items + 1, users.shape[0])
    owned = np.unique(users * (num_items + 1) + items)
    for _ in range(1000):
        clash = np.isin(users * (num_items + 1) + negatives, owned)
        if not clash.any():
            break
        negatives[clash] = rng.integers(1, num_items + 1, int(clash.sum()))
    else:
        raise ValueError(f"{name}: could not draw negatives: some user has reviewed nearly every item")

    def pairs(selected: np.ndarray) -> Samples:
        sample_users = np.concatenate([users[selected]] * 2)
        candidates = np.concatenate([items[selected], negatives[selected]])
        labels = np.concatenate([np.ones(selected.sum()), np.zeros(selected.sum())]).astype(np.float32)
        return Samples(users=sample_users, history_end=np.concatenate([position[selected]] * 2),
                       items=candidates, categories=item_categories[candidates], labels=labels)

    train = pairs((position >= 1) & (position <= length - 2))
    test = pairs((position == length - 1) & (length >= 2))
    return InteractionData(
        name=name, sequence_items=items, sequence_categories=item_categories[items], sequence_offsets=offsets,
        user_profile=np.arange(1, num_users + 1, dtype=np.int64)[:, None], item_categories=item_categories,
        vocabulary=Vocabulary(item_rows=num_items + 1, category_rows=int(item_categories.max()) + 1,
                              profile_names=("user_id",), profile_rows=(num_users + 1,)),
        train=train, test=test)
