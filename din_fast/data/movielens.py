"""MovieLens 20M (the paper's MovieLens set-up), read from the local files ``ratings.csv`` and
``movies.csv`` (plain or ``.gz``).

Every rating is a sample whose label is 1 for a rating of 4 or more (a "click"); its behaviours
are the movies the user rated 4 or more strictly earlier (by timestamp), in time order. A
movie's category is its first genre ("(no genres listed)" is a category of its own). The users
are split at random (by ``seed``) into training and test users, 100,000 : 38,493 as in the paper.
There are no profile features. ``ratings.csv`` (20M lines) is parsed in vectorized blocks of
4 MB, never held as text or Python objects: reading keeps 28 bytes per rating (user id, movie id
and timestamp as int64, the rating as float32; the ids are int64 so that any id below 2**53
stays distinct), and the preprocessing peaks near 140 bytes per rating (about 2.9 GB for the
20M ratings).
"""

from __future__ import annotations

import csv
import gzip
import math
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from ._files import DataFileError, locate, read_lines
from .batching import InteractionData, Samples, Vocabulary

RATINGS_FILE = "ratings.csv"
MOVIES_FILE = "movies.csv"
SOURCE = "GroupLens (grouplens.org/datasets/movielens/20m, ml-20m.zip)"
TEST_USER_FRACTION = 38493 / 138493
CLICK_RATING = 4.0
_BLOCK_BYTES = 1 << 22
# Ratings are parsed as float64, which holds every integer of smaller magnitude exactly: larger
# ids or timestamps could silently merge with their neighbours.
_INTEGER_LIMIT = 2 ** 53


def _parse_rating_line(path: Path, number: int, line: bytes) -> Tuple[int, int, float, int]:
    fields = line.strip().split(b",")
    if len(fields) != 4:
        raise DataFileError(path, number, f"expected 4 comma-separated fields (userId,movieId,rating,timestamp), "
                                          f"got {len(fields)}")
    # The block parser's rule: any number float64 reads, the ids and time whole, all finite.
    try:
        user, movie, rating, time = (float(field) for field in fields)
    except ValueError:
        user = movie = rating = time = math.nan
    if not all(abs(v) < _INTEGER_LIMIT and v == round(v) for v in (user, movie, time)) or not math.isfinite(rating):
        raise DataFileError(path, number, f"userId, movieId and timestamp must be integers of magnitude < 2**53 and "
                                          f"rating a finite number, got {line.strip().decode('utf-8', 'replace')!r}")
    return int(user), int(movie), rating, int(time)


def _parse_rating_block(path: Path, first_number: int, lines: List[bytes]) -> np.ndarray:
    """``[n, 4]`` float64 (userId, movieId, rating, timestamp) of a block of lines; on a bad
    block, parses line by line to report the first malformed one. Blank lines are skipped but
    counted, so that line numbers are the file's."""
    filled = [line.strip() for line in lines if line.strip()]
    try:
        fields = np.array(b",".join(filled).split(b","))
        if fields.shape[0] != 4 * len(filled):
            raise ValueError("field count")
        block = fields.astype(np.float64).reshape(-1, 4)
        # float64 reads "1.9", "nan" and "1e300" too: the ids and times must be whole and below
        # _INTEGER_LIMIT, the ratings finite.
        ids_and_times = block[:, [0, 1, 3]]
        if not (np.isfinite(block[:, 2]).all() and (np.abs(ids_and_times) < _INTEGER_LIMIT).all()
                and (ids_and_times == np.round(ids_and_times)).all()):
            raise ValueError("not integers")
        return block
    except ValueError:
        for offset, line in enumerate(lines):
            if line.strip():
                _parse_rating_line(path, first_number + offset, line)
        raise


def _rating_blocks(path: Path, max_ratings: Optional[int]) -> Iterator[np.ndarray]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as raw, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                          desc=RATINGS_FILE, leave=False) as progress:
        compressed = raw.fileobj if isinstance(raw, gzip.GzipFile) else raw
        header = raw.readline()
        if not header.strip().lower().startswith(b"userid,movieid,rating"):
            raise DataFileError(path, 1, f"expected the header userId,movieId,rating,timestamp, got "
                                         f"{header.strip().decode('utf-8', 'replace')!r}")
        number, read = 2, 0
        while max_ratings is None or read < max_ratings:
            lines = raw.readlines(_BLOCK_BYTES)
            if not lines:
                break
            if max_ratings is not None:
                lines = lines[:max_ratings - read]
            block = _parse_rating_block(path, number, lines)
            number += len(lines)
            read += block.shape[0]
            progress.update(compressed.tell() - progress.n)
            yield block


def _read_movies(path: Path) -> Dict[int, str]:
    genres: Dict[int, str] = {}
    for number, line in read_lines(path, MOVIES_FILE):
        if number == 1:
            if not line.lower().startswith("movieid,title,genres"):
                raise DataFileError(path, 1, f"expected the header movieId,title,genres, got {line!r}")
            continue
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error as err:
            raise DataFileError(path, number, f"not valid CSV ({err})") from None
        if len(fields) != 3:
            raise DataFileError(path, number, f"expected 3 fields (movieId,title,genres), got {len(fields)}")
        try:
            movie = int(fields[0])
        except ValueError:
            raise DataFileError(path, number, f"movieId must be an integer, got {fields[0]!r}") from None
        if abs(movie) >= _INTEGER_LIMIT:
            raise DataFileError(path, number, f"movieId must be of magnitude < 2**53 (as in {RATINGS_FILE}), "
                                              f"got {movie}")
        genres[movie] = fields[2].split("|")[0]
    return genres


def load_movielens(directory, seed: int = 0, test_user_fraction: float = TEST_USER_FRACTION,
                   max_ratings: Optional[int] = None) -> InteractionData:
    """Reads and preprocesses MovieLens 20M from ``directory``.

    Args:
        directory: folder holding ``ratings.csv`` and ``movies.csv``.
        seed: seed of the user split.
        test_user_fraction: share of users in the test split.
        max_ratings: read only the first ``max_ratings`` ratings (quick experiments).

    Raises:
        FileNotFoundError: a file is missing (the message says which and where they come from).
        DataFileError (a ValueError): a malformed line, with its file and line number.
    """
    if not 0.0 < test_user_fraction < 1.0:
        raise ValueError(f"test_user_fraction must be in (0, 1), got {test_user_fraction}")
    ratings_path, movies_path = locate(directory, (RATINGS_FILE, MOVIES_FILE), "MovieLens 20M", SOURCE)
    genre_of = _read_movies(movies_path)
    columns: Tuple[list, list, list, list] = ([], [], [], [])
    for block in _rating_blocks(ratings_path, max_ratings):
        for column, values, dtype in zip(columns, block.T, (np.int64, np.int64, np.float32, np.int64)):
            column.append(values.astype(dtype))
    if not columns[0]:
        raise DataFileError(ratings_path, 2, "no ratings in the file")
    raw_users, raw_movies, ratings, times = (np.concatenate(column) for column in columns)
    del columns
    clicks = ratings >= CLICK_RATING
    del ratings

    user_keys, users = np.unique(raw_users, return_inverse=True)
    listed = np.fromiter(genre_of, dtype=np.int64, count=len(genre_of))
    movie_keys, movies = np.unique(np.concatenate([raw_movies, listed]), return_inverse=True)
    movies = movies[:raw_movies.shape[0]] + 1
    genre_names = sorted(set(genre_of.values()) | {"(unknown)"})
    genre_id = {name: i + 1 for i, name in enumerate(genre_names)}
    item_categories = np.zeros(movie_keys.shape[0] + 1, dtype=np.int64)
    item_categories[1:] = [genre_id[genre_of.get(int(key), "(unknown)")] for key in movie_keys]

    # Sort by (user, time, movie); history = clicks at strictly earlier timestamps.
    order = np.lexsort((movies, times, users))
    users, movies, clicks, times = users[order], movies[order], clicks[order], times[order]
    num_users = user_keys.shape[0]
    clicks_before = np.concatenate([[0], np.cumsum(clicks)])
    new_moment = np.ones(users.shape[0], dtype=bool)
    new_moment[1:] = (users[1:] != users[:-1]) | (times[1:] != times[:-1])
    moment_start = np.maximum.accumulate(np.where(new_moment, np.arange(users.shape[0]), 0))
    click_offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users[clicks], minlength=num_users), out=click_offsets[1:])
    history_end = clicks_before[moment_start] - click_offsets[users]

    rng = np.random.default_rng(seed)
    test_user = np.zeros(num_users, dtype=bool)
    test_user[rng.permutation(num_users)[:int(round(test_user_fraction * num_users))]] = True
    samples = Samples(users=users, history_end=history_end, items=movies, categories=item_categories[movies],
                      labels=clicks.astype(np.float32))
    in_test = test_user[users]
    return InteractionData(
        name="movielens-20m", sequence_items=movies[clicks], sequence_categories=item_categories[movies[clicks]],
        sequence_offsets=click_offsets, user_profile=np.zeros((num_users, 0), dtype=np.int64),
        item_categories=item_categories,
        vocabulary=Vocabulary(item_rows=movie_keys.shape[0] + 1, category_rows=len(genre_names) + 1),
        train=samples.subset(~in_test), test=samples.subset(in_test))
