"""Data: the synthetic generator, batching, feature counts and the Amazon / MovieLens loaders
(on small files in the real formats, written here)."""

import gzip
import json
import re

import numpy as np
import pytest
import torch

from din_fast.data import (feature_counts, iterate_batches, load_amazon, load_movielens, make_batch,
                           make_synthetic)
from din_fast.data._files import DataFileError
from din_fast.frequency import FeatureCounter

SMALL = dict(num_users=300, num_items=200, num_categories=12)


def _user_history(data, user, end):
    start = data.sequence_offsets[user]
    return data.sequence_items[start:start + end], data.sequence_categories[start:start + end]


# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_consistent():
    a, b = make_synthetic(**SMALL, seed=3), make_synthetic(**SMALL, seed=3)
    for name in ("sequence_items", "sequence_categories", "sequence_offsets", "user_profile", "item_categories"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for split in ("train", "test"):
        for name in ("users", "history_end", "items", "categories", "labels"):
            np.testing.assert_array_equal(getattr(getattr(a, split), name), getattr(getattr(b, split), name))
    c = make_synthetic(**SMALL, seed=4)
    assert not np.array_equal(a.train.labels, c.train.labels)

    vocab = a.vocabulary
    assert a.sequence_items.min() >= 1 and a.sequence_items.max() < vocab.item_rows
    np.testing.assert_array_equal(a.item_categories[a.sequence_items], a.sequence_categories)
    for split in (a.train, a.test):
        np.testing.assert_array_equal(a.item_categories[split.items], split.categories)
        lengths = np.diff(a.sequence_offsets)[split.users]
        assert (split.history_end >= 1).all() and (split.history_end <= lengths).all()
        assert 0.2 < split.labels.mean() < 0.8
    # The test impressions see the whole history.
    np.testing.assert_array_equal(a.test.history_end, np.diff(a.sequence_offsets)[a.test.users])


# ----------------------------------------------------------------------------------------------
# batching and counts
# ----------------------------------------------------------------------------------------------


def test_make_batch_pads_and_keeps_most_recent():
    data = make_synthetic(**SMALL, seed=1)
    index = np.array([5, 0, 17, 42, 99])
    max_length = 7
    batch = make_batch(data, data.train, index, max_length)
    ends = data.train.history_end[index]
    expected_lengths = np.minimum(ends, max_length)
    assert batch.history_items.shape == (5, expected_lengths.max())
    assert batch.lengths.tolist() == expected_lengths.tolist()
    for row, (sample, length) in enumerate(zip(index, expected_lengths)):
        items, categories = _user_history(data, data.train.users[sample], data.train.history_end[sample])
        assert batch.history_items[row, :length].tolist() == items[-length:].tolist()
        assert batch.history_categories[row, :length].tolist() == categories[-length:].tolist()
        assert (batch.history_items[row, length:] == 0).all() and (batch.history_categories[row, length:] == 0).all()
    assert batch.items.tolist() == data.train.items[index].tolist()
    assert batch.labels.dtype == torch.float32 and batch.profile.shape == (5, 1)

    everything = list(iterate_batches(data, data.test, 64, 50, shuffle=True, rng=np.random.default_rng(0)))
    assert sum(len(b) for b in everything) == len(data.test)
    assert sorted(torch.cat([b.users for b in everything]).tolist()) == sorted(data.test.users.tolist())


def test_feature_counts_match_feature_counter():
    data = make_synthetic(**SMALL, seed=2)
    max_length = 9
    counts = feature_counts(data, max_length)
    vocab = data.vocabulary
    items = FeatureCounter(vocab.item_rows, padding_idx=0)
    categories = FeatureCounter(vocab.category_rows, padding_idx=0)
    segments = FeatureCounter(vocab.profile_rows[0], padding_idx=0)
    for batch in iterate_batches(data, data.train, 50, max_length):
        items.update(batch.items, batch.history_items)
        categories.update(batch.categories, batch.history_categories)
        segments.update(batch.profile[:, 0])
    np.testing.assert_array_equal(counts["item"], items.counts().numpy())
    np.testing.assert_array_equal(counts["category"], categories.counts().numpy())
    np.testing.assert_array_equal(counts["segment"], segments.counts().numpy())
    assert counts["item"].min() >= 1


# ----------------------------------------------------------------------------------------------
# Amazon Electronics
# ----------------------------------------------------------------------------------------------

# (reviewer, asin, time); the file order is not the time order.
REVIEWS = [("U2", "B03", 300), ("U1", "B02", 200), ("U1", "B01", 100), ("U2", "B01", 100), ("U1", "B04", 300),
           ("U2", "B05", 200), ("U1", "B03", 400), ("U2", "B06", 400), ("U1", "B05", 500)]
META = {"B01": [["Electronics", "Cameras"]], "B02": [["Electronics", "Audio", "Headphones"]],
        "B03": [["Electronics", "Cameras"], ["Electronics", "Tripods"]], "B04": [["Electronics", "Audio"]],
        "B05": [["Electronics", "Cameras"]], "B06": [["Electronics", "Cables"]], "B99": [["Unreviewed"]]}


def _write_amazon(folder, compress=False):
    reviews = "\n".join(json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0})
                        for u, a, t in REVIEWS) + "\n"
    # The original meta file: one Python dict literal per line (single quotes), not JSON.
    meta = "".join(repr({"asin": a, "title": f"thing '{a}'", "categories": c}) + "\n" for a, c in META.items())
    if compress:
        with gzip.open(folder / "reviews_Electronics_5.json.gz", "wt") as f:
            f.write(reviews)
    else:
        (folder / "reviews_Electronics_5.json").write_text(reviews)
    (folder / "meta_Electronics.json").write_text(meta)


@pytest.mark.parametrize("compress", [False, True])
def test_amazon_loader(tmp_path, compress):
    _write_amazon(tmp_path, compress)
    data = load_amazon(tmp_path, seed=0)
    # Ids in sorted key order: items B01..B06 -> 1..6; categories Audio, Cables, Cameras,
    # Headphones, Tripods -> 1..5 (last entry of the last path).
    expected_category = {"B01": 3, "B02": 4, "B03": 5, "B04": 1, "B05": 3, "B06": 2}
    assert data.vocabulary.item_rows == 7 and data.vocabulary.category_rows == 6
    assert data.item_categories[1:].tolist() == [expected_category[f"B0{i}"] for i in range(1, 7)]
    # U1 (user 0) by time: B01, B02, B04, B03, B05; U2 (user 1): B01, B05, B03, B06.
    assert data.sequence_items.tolist() == [1, 2, 4, 3, 5, 1, 5, 3, 6]
    assert data.sequence_offsets.tolist() == [0, 5, 9]
    assert data.user_profile[:, 0].tolist() == [1, 2]
    # Train: positions 1..L-2, each a positive and a negative -> 2 * (3 + 2); test: one pair per user.
    assert len(data.train) == 10 and len(data.test) == 4
    positives = data.train.labels == 1
    pairs = sorted(zip(data.train.users[positives].tolist(), data.train.history_end[positives].tolist(),
                       data.train.items[positives].tolist()))
    assert pairs == [(0, 1, 2), (0, 2, 4), (0, 3, 3), (1, 1, 5), (1, 2, 3)]
    test_positive = data.test.labels == 1
    assert sorted(zip(data.test.users[test_positive].tolist(), data.test.items[test_positive].tolist(),
                      data.test.history_end[test_positive].tolist())) == [(0, 5, 4), (1, 6, 3)]
    for split in (data.train, data.test):
        negatives = split.labels == 0
        for user, item in zip(split.users[negatives], split.items[negatives]):
            owned = data.sequence_items[data.sequence_offsets[user]:data.sequence_offsets[user + 1]]
            assert item not in owned
        np.testing.assert_array_equal(split.categories, data.item_categories[split.items])


def test_amazon_malformed_line_names_file_and_line(tmp_path):
    _write_amazon(tmp_path)
    path = tmp_path / "reviews_Electronics_5.json"
    lines = path.read_text().splitlines()
    lines[3] = '{"reviewerID": "U9", "asin": '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"reviews_Electronics_5\.json:4: ") as error:
        load_amazon(tmp_path)
    assert error.value.line_number == 4 and isinstance(error.value, ValueError)

    _write_amazon(tmp_path)
    lines = path.read_text().splitlines()
    lines[6] = json.dumps({"reviewerID": "U1", "unixReviewTime": 5})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"reviews_Electronics_5\.json:7: missing field 'asin'"):
        load_amazon(tmp_path)


@pytest.mark.parametrize("file_name, line, message", [
    ("reviews_Electronics_5.json", '{"reviewerID": "U1", "asin": "B02", "unixReviewTime": Infinity}',
     "unixReviewTime must be an integer"),
    ("reviews_Electronics_5.json", '{"reviewerID": "U1", "asin": "B02", "unixReviewTime": 100000000000000000000}',
     "unixReviewTime must be an integer"),
    ("meta_Electronics.json", '{"asin": ["B02"], "categories": []}', "asin must be a string"),
    ("meta_Electronics.json", '{"asin": "B02", "categories": "Electronics"}',
     "categories must be a list of category paths"),
    ("meta_Electronics.json", '{"asin": "B02", "categories": ["Electronics"]}',
     "categories must be a list of category paths"),
], ids=["time-infinity", "time-beyond-64-bits", "asin-list", "categories-string", "categories-list-of-strings"])
def test_amazon_bad_field_names_file_line_and_field(tmp_path, file_name, line, message):
    _write_amazon(tmp_path)
    path = tmp_path / file_name
    lines = path.read_text().splitlines()
    lines[1] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=re.escape(f"{file_name}:2: {message}")):
        load_amazon(tmp_path)


def test_amazon_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="reviews_Electronics_5.json, meta_Electronics.json") as error:
        load_amazon(tmp_path)
    assert str(tmp_path) in str(error.value) and "never downloads" in str(error.value)


# ----------------------------------------------------------------------------------------------
# MovieLens 20M
# ----------------------------------------------------------------------------------------------

RATINGS = [  # userId, movieId, rating, timestamp (file order by user, not by time)
    (1, 10, 4.0, 300), (1, 20, 5.0, 100), (1, 30, 2.5, 200), (1, 40, 4.5, 300), (1, 50, 3.0, 400),
    (2, 20, 4.0, 50), (2, 10, 1.0, 60), (2, 30, 4.0, 70),
    (3, 40, 5.0, 10), (3, 50, 4.0, 20),
]
MOVIES = [(10, "Toy Story (1995)", "Adventure|Animation"), (20, "Heat, The (1995)", "Action|Crime"),
          (30, 'Movie "Quoted", Part 2 (2001)', "Comedy"), (40, "Nothing (2002)", "(no genres listed)"),
          (50, "Drama Time (1999)", "Drama|Romance")]


def _write_movielens(folder):
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in RATINGS))
    import csv
    with open(folder / "movies.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows(MOVIES)


def test_movielens_loader(tmp_path):
    _write_movielens(tmp_path)
    data = load_movielens(tmp_path, seed=0, test_user_fraction=0.34)
    # Movies 10..50 -> ids 1..5; categories: first genres sorted, "(unknown)" included.
    genres = sorted({"Adventure", "Action", "Comedy", "(no genres listed)", "Drama", "(unknown)"})
    assert data.item_categories[1:].tolist() == [genres.index(g) + 1 for g in
                                                 ("Adventure", "Action", "Comedy", "(no genres listed)", "Drama")]
    assert data.vocabulary.profile_rows == () and data.user_profile.shape == (3, 0)
    # Behaviours are the clicks (rating >= 4) in time order: user 1: 20 (t100), 10 and 40 (t300,
    # ordered by movie); user 2: 20, 30; user 3: 40, 50.
    assert data.sequence_items.tolist() == [2, 1, 4, 2, 3, 4, 5]
    assert data.sequence_offsets.tolist() == [0, 3, 5, 7]
    samples = {}
    for split in (data.train, data.test):
        for user, item, end, label in zip(split.users, split.items, split.history_end, split.labels):
            samples[(int(user), int(item))] = (int(end), float(label))
    assert len(samples) == len(RATINGS)
    # History = clicks at strictly earlier timestamps: movie 10 and 40 (both t300) see only 20.
    assert samples[(0, 1)] == (1, 1.0) and samples[(0, 4)] == (1, 1.0)
    assert samples[(0, 2)] == (0, 1.0) and samples[(0, 3)] == (1, 0.0) and samples[(0, 5)] == (3, 0.0)
    assert samples[(1, 3)] == (1, 1.0) and samples[(2, 5)] == (1, 1.0)
    # The split is by user.
    assert not set(data.train.users.tolist()) & set(data.test.users.tolist())
    assert len(set(data.test.users.tolist())) == 1

    limited = load_movielens(tmp_path, max_ratings=5, test_user_fraction=0.5)
    assert len(limited.train) + len(limited.test) == 5


def test_movielens_malformed_line_names_file_and_line(tmp_path):
    _write_movielens(tmp_path)
    path = tmp_path / "ratings.csv"
    lines = path.read_text().splitlines()
    lines[4] = "1,40,four,300"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"ratings\.csv:5: "):
        load_movielens(tmp_path)
    lines[4] = "1,40,4.5"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"ratings\.csv:5: expected 4 comma-separated fields"):
        load_movielens(tmp_path)
    # Numbers a float parser takes but an id, a time or a rating cannot be.
    for bad in ("1.9,40,4.0,300", "1,40.5,4.0,300", "1,40,nan,300", "1,40,4.0,inf"):
        lines[4] = bad
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataFileError, match=r"ratings\.csv:5: userId, movieId and timestamp must be integers"):
            load_movielens(tmp_path)

    # Blank lines count: the bad line is the file's line 7.
    lines = path.read_text().splitlines()
    lines[2:2] = ["", ""]
    lines[6] = "1,40,four,300"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"ratings\.csv:7: "):
        load_movielens(tmp_path)

    _write_movielens(tmp_path)
    movies = tmp_path / "movies.csv"
    lines = movies.read_text().splitlines()
    lines[2] = "x20,Heat,Action"
    movies.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"movies\.csv:3: movieId must be an integer"):
        load_movielens(tmp_path)


def test_movielens_ids_beyond_32_bits_stay_apart(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n3000000000,1,4.0,10\n3000000000,2,4.0,11\n"
                                          "3000000001,1,4.0,12\n3000000001,4294967298,2.0,13\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n2,B,Comedy\n4294967298,C,Action\n")
    data = load_movielens(tmp_path, test_user_fraction=0.5)
    # Two users (two clicks, then one) and three movies.
    assert data.sequence_offsets.tolist() == [0, 2, 3] and data.sequence_items.tolist() == [1, 2, 1]
    assert data.vocabulary.item_rows == 4
    assert data.item_categories[1:].tolist() == [4, 3, 2]  # (unknown), Action, Comedy, Drama -> 1..4
    # Beyond 2**53, float64 (the parser's type) cannot hold every integer: such ids are refused.
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n9007199254740993,1,4.0,11\n")
    with pytest.raises(DataFileError, match=r"ratings\.csv:3: userId, movieId and timestamp must be integers"):
        load_movielens(tmp_path)
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n9007199254740993,B,Comedy\n")
    with pytest.raises(DataFileError, match=r"movies\.csv:3: movieId must be of magnitude < 2\*\*53"):
        load_movielens(tmp_path)


def test_movielens_missing_files_are_named(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n")
    with pytest.raises(FileNotFoundError, match=r"missing ratings\.csv in ") as error:
        load_movielens(tmp_path)
    assert "never downloads" in str(error.value)
