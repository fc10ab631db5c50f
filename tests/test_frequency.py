"""Feature frequency counts n_j for MBA regularization."""

import numpy as np
import pytest
import torch

from din_fast.frequency import FeatureCounter, count_features


def _expected(columns, num_rows, padding_idx=None):
    flat = torch.cat([torch.as_tensor(c).reshape(-1).long() for c in columns])
    if padding_idx is not None:
        flat = flat[flat != padding_idx]
    return torch.bincount(flat, minlength=num_rows)


def test_streaming_counts_over_columns_and_batches():
    num_rows = 37
    batches = [(torch.randint(0, num_rows, (5,)), torch.randint(0, num_rows, (5, 7), dtype=torch.int32))
               for _ in range(4)]
    counter = FeatureCounter(num_rows)
    for item, history in batches:
        counter.update(item, history)
    columns = [c for batch in batches for c in batch]
    raw = _expected(columns, num_rows)
    assert torch.equal(counter.occurrences(), raw)
    counts = counter.counts()
    assert counts.dtype == torch.int64 and counts.shape == (num_rows,)
    assert torch.equal(counts, raw.clamp(min=1))
    assert int(counts.min()) >= 1


def test_unseen_ids_and_padding_count_as_one():
    counter = FeatureCounter(6, padding_idx=0)
    counter.update(torch.tensor([[0, 0, 2, 2, 2], [5, 0, 0, 2, 0]]))
    assert counter.counts().tolist() == [1, 1, 4, 1, 1, 1]
    assert counter.occurrences().tolist() == [0, 0, 4, 0, 0, 1]


def test_numpy_columns_and_count_features():
    num_rows = 11
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    batches = [rng.integers(0, num_rows, size=(3, 4)) for _ in range(3)]
    pairs = [(torch.from_numpy(b[:, 0]), b[:, 1:].astype(np.int16)) for b in batches]
    expected = _expected(batches, num_rows, padding_idx=3).clamp(min=1)
    assert torch.equal(count_features(batches, num_rows, padding_idx=3), expected)
    assert torch.equal(count_features(pairs, num_rows, padding_idx=3), expected)
    # A reversed view (negative strides) counts like the array it views.
    reversed_views = [b[::-1, ::-1] for b in batches]
    assert torch.equal(count_features(reversed_views, num_rows, padding_idx=3), expected)


@pytest.mark.parametrize("bad, error, message", [
    (torch.tensor([1, 9]), ValueError, r"ids\[1\] must lie in \[0, 9\)"),
    (torch.tensor([-2, 3]), ValueError, r"ids\[1\] must lie in"),
    (torch.tensor([1.0]), TypeError, r"ids\[1\] must hold integer ids"),
    ([1, 2], TypeError, r"ids\[1\] must be a torch.Tensor or numpy array"),
])
def test_bad_ids_raise_and_count_nothing(bad, error, message):
    counter = FeatureCounter(9)
    counter.update(torch.tensor([4, 4]))
    with pytest.raises(error, match=message):
        counter.update(torch.tensor([1, 2]), bad)  # the good first column is not counted either
    assert counter.occurrences().tolist() == [0, 0, 0, 0, 2, 0, 0, 0, 0]


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_rows must be a positive int"):
        FeatureCounter(0)
    with pytest.raises(ValueError, match="padding_idx must lie in"):
        FeatureCounter(5, padding_idx=5)
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        FeatureCounter(5, padding_idx=1.0)


def test_single_column_error_names_ids():
    with pytest.raises(ValueError, match=r"^ids must lie in \[0, 4\)"):
        FeatureCounter(4).update(torch.tensor([4]))
