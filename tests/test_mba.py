"""Mini-batch aware regularization (eq. 4-7): penalty, fused updates and the MBASGD optimizer,
on the triton backend (natively on a GPU, else in Triton's interpreter) and the torch backend, against the float64
reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import din_fast
from din_fast import reference as R
from din_fast.kernels import mba as K
from din_fast.optim import MBASGD, mba_sgd_fused_, mba_sgd_step_
from din_fast.testing import KERNEL_DEVICE, assert_close, nan_filled
from din_fast.triton_ops import mba as T

pytestmark = pytest.mark.usefixtures("on_kernel_device")

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# lr * lam / n_j is 0.05 to 0.4 with the counts below: a step that dropped the regularization
# would miss even the 16-bit bounds.
LAM, LR = 3.7, 0.11


def _table(num_rows, dim, dtype):
    return torch.randn(num_rows, dim, dtype=torch.float64).to(dtype)


def _counts(num_rows):
    return torch.randint(1, 9, (num_rows,))


def _batch_ids(num_rows, shape, dtype=torch.int64):
    """Random ids with a heavy duplicate: id 3 fills a third of the batch."""
    ids = torch.randint(0, num_rows, shape)
    ids.view(-1)[: ids.numel() // 3] = 3
    return ids[..., torch.randperm(shape[-1])].to(dtype)


def _dense_grad(weight, ids):
    """A lookup-like dense gradient: random on the batch's rows, zero elsewhere."""
    present = R.batch_indicator(ids, weight.shape[0])
    return torch.randn(weight.shape, dtype=torch.float64).to(weight.dtype) * present[:, None]


def _assert_untouched(before, after, ids, padding_idx=None):
    outside = ~R.batch_indicator(ids, before.shape[0])
    if padding_idx is not None:
        outside[padding_idx] = True
    assert torch.equal(after[outside], before[outside]), "rows outside the batch changed"


# ----------------------------------------------------------------------------------------------
# Penalty
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_penalty_forward_backward_match_reference(dtype, ids_dtype):
    num_rows, dim = 41, 18
    weight = _table(num_rows, dim, dtype).requires_grad_()
    ids = _batch_ids(num_rows, (3, 7), ids_dtype)
    counts = _counts(num_rows)

    value = din_fast.mba_penalty(weight, ids, counts, LAM, backend="triton")
    value.backward()

    weight64 = weight.detach().to(torch.float64).requires_grad_()
    expected = R.mba_penalty(weight64, ids.long(), counts, LAM)
    expected.backward()
    assert value.dtype == dtype and value.dim() == 0
    assert_close(value, expected, dtype, "penalty")
    assert_close(weight.grad, weight64.grad, dtype, "grad weight")
    outside = ~R.batch_indicator(ids.long(), num_rows)
    assert torch.equal(weight.grad[outside], torch.zeros_like(weight.grad[outside]))


def test_penalty_with_float_counts_and_wide_rows():
    # D = 150 runs the forward's D loop (BLOCK_D = 128) and two column blocks in backward.
    num_rows, dim = 9, 150
    weight = _table(num_rows, dim, torch.float32).requires_grad_()
    ids = torch.tensor([[8, 0, 8], [5, 5, 0]])
    counts = torch.rand(num_rows, dtype=torch.float64) * 10 + 1
    value = din_fast.mba_penalty(weight, ids, counts, LAM, backend="triton")
    value.backward()
    weight64 = weight.detach().double().requires_grad_()
    expected = R.mba_penalty(weight64, ids, counts, LAM)
    expected.backward()
    assert_close(value, expected, torch.float32, "penalty")
    assert_close(weight.grad, weight64.grad, torch.float32, "grad weight")


def test_penalty_launchers_write_exactly_the_batch_rows():
    num_rows, dim = 23, 36
    weight = _table(num_rows, dim, torch.float32)
    rows = torch.tensor([0, 4, 5, 17, 22])
    row_counts = torch.randint(1, 9, (rows.numel(),)).float()

    out = K.mba_penalty_rows(weight, rows, row_counts, out=nan_filled(rows.shape, torch.float32, KERNEL_DEVICE))
    expected = (weight[rows].double() ** 2).sum(1) / row_counts.double()
    assert_close(out, expected, torch.float32, "per-row penalty")

    coef = torch.tensor([0.8])
    grad_weight = K.mba_penalty_backward(weight, rows, row_counts, coef,
                                         nan_filled(weight.shape, torch.float32, KERNEL_DEVICE))
    assert_close(grad_weight[rows], 0.8 * weight[rows].double() / row_counts.double()[:, None], torch.float32,
                 "grad rows")
    others = torch.ones(num_rows, dtype=torch.bool)
    others[rows] = False
    assert torch.isnan(grad_weight[others]).all(), "the backward kernel wrote rows outside the batch"


def test_penalty_traces_under_torch_compile():
    num_rows, dim = 13, 8
    weight = _table(num_rows, dim, torch.float32).requires_grad_()
    ids = _batch_ids(num_rows, (2, 5))
    counts = _counts(num_rows)

    def loss_fn(w):
        return T.mba_penalty(w, ids, counts, LAM) * 3.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    value = compiled(weight)
    value.backward()
    weight64 = weight.detach().double().requires_grad_()
    expected = R.mba_penalty(weight64, ids, counts, LAM) * 3.0
    expected.backward()
    assert_close(value, expected, torch.float32, "compiled penalty")
    assert_close(weight.grad, weight64.grad, torch.float32, "compiled grad weight")


def test_penalty_op_registration():
    num_rows, dim = 7, 4
    weight = _table(num_rows, dim, torch.float32).requires_grad_()
    ids = torch.tensor([1, 6, 1, 2])
    torch.library.opcheck(torch.ops.din_fast.mba_penalty.default, (weight, ids, _counts(num_rows), LAM),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# Fused updates
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step_dense_grad_matches_reference(backend, dtype):
    num_rows, dim = 37, 18
    weight = _table(num_rows, dim, dtype)
    ids = _batch_ids(num_rows, (4, 9))
    counts = _counts(num_rows)
    grad = _dense_grad(weight, ids)
    before = weight.clone()

    out = mba_sgd_step_(weight, grad, ids, counts, lam=LAM, lr=LR, backend=backend)

    assert out is weight
    expected = R.mba_sgd_step(before.double(), grad.double(), ids, counts, lam=LAM, lr=LR)
    assert_close(weight, expected, dtype, "weight after step")
    _assert_untouched(before, weight, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_ids", [False, True])
def test_sgd_step_sparse_grad_matches_reference(backend, pass_ids):
    num_rows, dim = 31, 6
    embedding = nn.Embedding(num_rows, dim, sparse=True).double()
    ids = _batch_ids(num_rows, (5, 4))
    embedding(ids).pow(2).sum().backward()
    grad = embedding.weight.grad
    assert grad.is_sparse and not grad.is_coalesced()
    counts = _counts(num_rows)
    weight = embedding.weight.data
    before = weight.clone()

    mba_sgd_step_(weight, grad, ids if pass_ids else None, counts, lam=LAM, lr=LR, backend=backend)

    expected = R.mba_sgd_step(before, grad.to_dense(), ids, counts, lam=LAM, lr=LR)
    assert_close(weight, expected, torch.float64, "weight after sparse step")
    _assert_untouched(before, weight, ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_step_regularizes_batch_rows_without_gradient_entries(backend):
    # ids names rows the sparse gradient does not hold: they are regularized only.
    num_rows, dim = 12, 5
    weight = _table(num_rows, dim, torch.float64)
    grad_ids = torch.tensor([[2, 7, 2]])
    values = torch.randn(3, dim, dtype=torch.float64)
    grad = torch.sparse_coo_tensor(grad_ids, values, (num_rows, dim), check_invariants=True)
    ids = torch.tensor([2, 7, 9, 11])
    counts = _counts(num_rows)
    before = weight.clone()

    mba_sgd_step_(weight, grad, ids, counts, lam=LAM, lr=LR, backend=backend)

    expected = R.mba_sgd_step(before, grad.to_dense(), ids, counts, lam=LAM, lr=LR)
    assert_close(weight, expected, torch.float64, "weight")
    _assert_untouched(before, weight, ids)


def _check_fused_step(ids, num_rows, dim, dtype, backend, scale):
    """``mba_sgd_fused_`` with random lookup gradients for ``ids`` [B, L] against the reference
    step from the float64 dense gradient; ``scale`` widens the tolerance for long sums."""
    weight = _table(num_rows, dim, dtype)
    grad_rows = torch.randn(*ids.shape, dim, dtype=torch.float64).to(dtype)
    counts = _counts(num_rows)
    before = weight.clone()

    mba_sgd_fused_(weight, ids, grad_rows, counts, lam=LAM, lr=LR, backend=backend)

    dense = torch.zeros(num_rows, dim, dtype=torch.float64).index_add_(0, ids.reshape(-1),
                                                                        grad_rows.reshape(-1, dim).double())
    expected = R.mba_sgd_step(before.double(), dense, ids, counts, lam=LAM, lr=LR)
    assert_close(weight, expected, dtype, "weight after fused step", scale=scale)
    _assert_untouched(before, weight, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference(backend, dtype):
    # 21 ids, a third of them id 3: one segment longer than the kernels' block of 16 rows.
    ids = _batch_ids(29, (3, 21))
    ids[0, 0:18] = 3
    # The gradient of id 3 sums ~25 rounded rows.
    _check_fused_step(ids, 29, 36, dtype, backend, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_with_hot_ids_cut_into_pieces(backend, dtype):
    # Id 2 has more entries than 16 pieces hold (the update kernel loops over its pieces), id 5
    # two pieces and one entry, ids 0 and 7 one or two entries, the others none.
    piece = K._PIECE_ENTRIES
    ids = torch.cat([torch.full((16 * piece + 37,), 2), torch.full((2 * piece + 1,), 5), torch.tensor([0, 7, 7])])
    # Id 2's gradient sums 4,133 rounded rows.
    _check_fused_step(ids[torch.randperm(ids.numel())].reshape(1, -1), 9, 5, dtype, backend, scale=4.0)


def test_segment_pieces_cover_each_segment_in_order():
    piece = K._PIECE_ENTRIES
    lengths = torch.tensor([0, 1, piece, piece + 1, 3 * piece, 0, 17 * piece - 5])
    seg_end = lengths.cumsum(0)
    seg_start = seg_end - lengths
    piece_lo, piece_hi, piece_start, piece_end = K._segment_pieces(seg_start, seg_end, int(lengths.sum()))
    assert piece_lo.shape[0] == lengths.numel() + int(lengths.sum()) // piece
    for u in range(lengths.numel()):
        lo, hi = piece_lo[piece_start[u]:piece_end[u]], piece_hi[piece_start[u]:piece_end[u]]
        assert lo.numel() == -(-int(lengths[u]) // piece)
        if lo.numel():
            # Consecutive, each at most a piece long, together the whole segment.
            assert lo[0] == seg_start[u] and hi[-1] == seg_end[u] and torch.equal(lo[1:], hi[:-1])
            assert bool(((hi - lo) >= 1).all() and ((hi - lo) <= piece).all())
    # The pieces past the last are empty.
    assert bool((piece_hi[piece_end[-1]:] == piece_lo[piece_end[-1]:]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_never_touches_padding(backend):
    num_rows, dim, pad = 17, 7, 0
    weight = _table(num_rows, dim, torch.float32)
    ids = torch.tensor([[0, 0, 5, 9], [3, 0, 9, 0]], dtype=torch.int32)
    grad_rows = torch.randn(2, 4, dim)
    counts = _counts(num_rows)
    before = weight.clone()

    mba_sgd_fused_(weight, ids, grad_rows, counts, lam=LAM, lr=LR, padding_idx=pad, backend=backend)

    assert torch.equal(weight[pad], before[pad])
    keep = (ids != pad).reshape(-1)
    flat_ids = ids.reshape(-1).long()[keep]
    dense = torch.zeros(num_rows, dim, dtype=torch.float64).index_add_(0, flat_ids,
                                                                        grad_rows.reshape(-1, dim)[keep].double())
    expected = R.mba_sgd_step(before.double(), dense, flat_ids, counts, lam=LAM, lr=LR)
    assert_close(weight, expected, torch.float32, "weight after fused step")
    _assert_untouched(before, weight, ids.long(), padding_idx=pad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "fused"])
def test_repeated_id_is_regularized_once(backend, form):
    num_rows, dim, hot = 10, 4, 6
    weight = _table(num_rows, dim, torch.float64)
    ids = torch.full((40,), hot)
    counts = torch.full((num_rows,), 3)
    before = weight.clone()
    lam, lr = 2.0, 0.25
    if form == "dense":
        mba_sgd_step_(weight, torch.zeros_like(weight), ids, counts, lam=lam, lr=lr, backend=backend)
    else:
        mba_sgd_fused_(weight, ids, torch.zeros(40, dim, dtype=torch.float64), counts, lam=lam, lr=lr,
                       backend=backend)
    # Once: w * (1 - lr * lam / n); 40 times would shrink it to ~0.
    assert_close(weight[hot], before[hot] * (1 - lr * lam / 3), torch.float64, "hot row")
    _assert_untouched(before, weight, ids)


def test_launchers_leave_other_rows_bit_identical_with_nan_table():
    # NaN everywhere outside the batch: a kernel reading or writing any other row would show.
    num_rows, dim = 19, 18
    weight = nan_filled((num_rows, dim), torch.float32, KERNEL_DEVICE)
    rows = torch.tensor([2, 3, 11])
    weight[rows] = torch.randn(3, dim)
    grad = torch.randn(num_rows, dim)
    row_counts = torch.tensor([1.0, 4.0, 2.0])
    K.mba_sgd_dense_(weight, grad, rows, row_counts, LAM, LR)
    assert torch.isfinite(weight[rows]).all()
    others = torch.ones(num_rows, dtype=torch.bool)
    others[rows] = False
    assert torch.isnan(weight[others]).all()


# ----------------------------------------------------------------------------------------------
# MBASGD optimizer
# ----------------------------------------------------------------------------------------------


class _TinyModel(nn.Module):
    def __init__(self, num_rows, dim, sparse):
        super().__init__()
        self.embedding = nn.Embedding(num_rows, dim, sparse=sparse)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids):
        return self.head(self.embedding(ids).sum(1)).squeeze(-1)


def _reference_loss(table, head_w, head_b, ids, target):
    return ((F.linear(F.embedding(ids, table).sum(1), head_w, head_b).squeeze(-1) - target) ** 2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("steps", [1, 100])
def test_mbasgd_matches_reference_loop(backend, sparse, steps):
    num_rows, dim, batch, seq = 17, 5, 3, 4
    model = _TinyModel(num_rows, dim, sparse).double()
    counts = _counts(num_rows)
    # A rate small enough that 100 steps of this squared loss stay bounded (LR diverges).
    lr = 0.01
    optimizer = MBASGD(model.parameters(), lr=lr, embeddings=[(model.embedding, counts)], lam=LAM, backend=backend)
    params = [p.detach().clone().requires_grad_() for p in (model.embedding.weight, model.head.weight,
                                                            model.head.bias)]
    initial_table = model.embedding.weight.detach().clone()
    for _ in range(steps):
        ids = torch.randint(0, num_rows, (batch, seq))
        target = torch.randn(batch, dtype=torch.float64)

        optimizer.zero_grad()
        ((model(ids) - target) ** 2).mean().backward()
        optimizer.step()

        table, head_w, head_b = params
        grads = torch.autograd.grad(_reference_loss(table, head_w, head_b, ids, target), params)
        with torch.no_grad():
            table.copy_(R.mba_sgd_step(table, grads[0], ids, counts, lam=LAM, lr=lr))
            head_w -= lr * grads[1]
            head_b -= lr * grads[2]

    # A step's rounding differs from the reference's (gathered rows, fused multiply-adds), and
    # 100 steps compound it.
    scale = 1.0 if steps == 1 else 100.0
    assert all(torch.isfinite(p).all() for p in params), "the trajectory diverged; the comparison would be vacuous"
    # The table moved by far more than the comparison's float64 tolerance (about 1e-8): one step
    # at this rate moves it by about 1e-3 to 5e-2 (largest entry), depending on the random batch.
    assert (model.embedding.weight - initial_table).abs().max() > 1e-6
    assert_close(model.embedding.weight, params[0], torch.float64, "table", scale=scale)
    assert_close(model.head.weight, params[1], torch.float64, "head weight", scale=scale)
    assert_close(model.head.bias, params[2], torch.float64, "head bias", scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
def test_mbasgd_padding_row_and_unused_rows_untouched(backend, sparse):
    num_rows, dim = 15, 4
    embedding = nn.Embedding(num_rows, dim, padding_idx=0, sparse=sparse)
    with torch.no_grad():
        embedding.weight[0] = torch.randn(dim)  # a nonzero padding row would show any update
    optimizer = MBASGD([], lr=LR, embeddings=[(embedding, _counts(num_rows))], lam=LAM, backend=backend)
    before = embedding.weight.detach().clone()
    ids = torch.tensor([[0, 0, 4, 7], [7, 0, 0, 12]])
    optimizer.zero_grad()
    embedding(ids).sum().backward()
    optimizer.step()
    after = embedding.weight.detach()
    assert torch.equal(after[0], before[0])
    _assert_untouched(before, after, ids, padding_idx=0)
    assert not torch.equal(after[4], before[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mbasgd_bare_weight_needs_recorded_ids(backend):
    num_rows, dim = 11, 3
    weight = nn.Parameter(_table(num_rows, dim, torch.float64))
    counts = _counts(num_rows)
    optimizer = MBASGD([weight], lr=LR, embeddings=[(weight, counts)], lam=LAM, backend=backend)
    ids = torch.tensor([1, 5, 5, 9])
    before = weight.detach().clone()

    F.embedding(ids, weight).sum().backward()
    with pytest.raises(RuntimeError, match="record_ids"):
        optimizer.step()
    assert torch.equal(weight.detach(), before)

    optimizer.record_ids(weight, ids)
    optimizer.step()
    expected = R.mba_sgd_step(before, weight.grad, ids, counts, lam=LAM, lr=LR)
    assert_close(weight, expected, torch.float64, "table")
    _assert_untouched(before, weight.detach(), ids)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error and the table unchanged
# ----------------------------------------------------------------------------------------------


def _bad_step_cases():
    num_rows, dim = 9, 4
    ids = torch.tensor([1, 4, 4])

    def case(**changes):
        args = dict(grad=None, ids=ids, counts=torch.full((num_rows,), 2), lam=LAM, lr=LR, padding_idx=None)
        args.update(changes)
        return args

    return num_rows, dim, [
        (case(ids=torch.tensor([1, 9])), ValueError, "ids must lie in"),
        (case(ids=torch.tensor([-1, 2])), ValueError, "ids must lie in"),
        (case(ids=torch.tensor([1.0, 2.0])), TypeError, "ids must be an int32 or int64"),
        (case(ids=torch.tensor([1, 2], device="meta")), ValueError, "ids must be on"),
        (case(counts=torch.tensor([2, 2, 2, 2, 0, 2, 2, 2, 2])), ValueError, "counts must be >= 1"),
        (case(counts=torch.tensor([2.0, float("nan"), 2, 2, 2, 2, 2, 2, 2])), ValueError, "counts must be >= 1"),
        (case(counts=torch.full((num_rows + 1,), 2)), ValueError, r"counts must have shape \[9\]"),
        (case(counts=torch.ones(num_rows, dtype=torch.bool)), TypeError, "counts must be a real tensor"),
        (case(grad="float64"), TypeError, "grad(_rows)? must have weight's dtype"),
        (case(lr=-1.0), ValueError, "lr must be >= 0"),
        (case(lam=-1.0), ValueError, "lam must be >= 0"),
        (case(lr=float("inf")), ValueError, "lr must be finite"),
        (case(padding_idx=9), ValueError, "padding_idx must lie in"),
    ]


_, _, _BAD_CASES = _bad_step_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "fused"])
@pytest.mark.parametrize("case", range(len(_BAD_CASES)))
def test_bad_input_raises_and_leaves_table_unchanged(backend, form, case):
    num_rows, dim, cases = _bad_step_cases()
    args, error, message = cases[case]
    weight = _table(num_rows, dim, torch.float32)
    before = weight.clone()
    grad_dtype = torch.float64 if args.pop("grad") == "float64" else torch.float32
    ids = args.pop("ids")
    with pytest.raises(error, match=message):
        if form == "dense":
            grad = torch.randn(num_rows, dim, dtype=grad_dtype)
            mba_sgd_step_(weight, grad, ids, backend=backend, **args)
        else:
            grad_rows = torch.randn(ids.numel(), dim, dtype=grad_dtype, device=ids.device)
            mba_sgd_fused_(weight, ids, grad_rows, backend=backend, **args)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_rows_outside_ids_rejected(backend):
    num_rows, dim = 8, 3
    weight = _table(num_rows, dim, torch.float32)
    before = weight.clone()
    grad = torch.sparse_coo_tensor(torch.tensor([[1, 6]]), torch.randn(2, dim), (num_rows, dim),
                                   check_invariants=True)
    with pytest.raises(ValueError, match="not in ids"):
        mba_sgd_step_(weight, grad, torch.tensor([1, 2]), torch.ones(num_rows), lam=LAM, lr=LR, backend=backend)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_change_nothing(backend):
    # A batch of padding only, or a sparse gradient with no entry: no row to update.
    weight = _table(8, 3, torch.float32)
    before = weight.clone()
    counts = torch.ones(8)
    mba_sgd_fused_(weight, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3), counts, lam=LAM, lr=LR,
                   backend=backend)
    mba_sgd_fused_(weight, torch.zeros(4, dtype=torch.int64), torch.randn(4, 3), counts, lam=LAM, lr=LR,
                   padding_idx=0, backend=backend)
    empty_grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, 3), (8, 3),
                                         check_invariants=True)
    mba_sgd_step_(weight, empty_grad, None, counts, lam=LAM, lr=LR, backend=backend)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
def test_mbasgd_with_a_table_the_batch_left_unused(backend, sparse):
    # zero_grad(set_to_none=False) leaves the unused table a zero gradient and no recorded ids;
    # a warm-up schedule's lr of 0 changes nothing either.
    used, unused = nn.Embedding(6, 3, sparse=sparse), nn.Embedding(5, 3, sparse=sparse)
    optimizer = MBASGD([*used.parameters(), *unused.parameters()], lr=LR,
                       embeddings=[(used, torch.ones(6)), (unused, torch.ones(5))], lam=LAM, backend=backend)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: float(epoch))
    for step in range(2):
        optimizer.zero_grad(set_to_none=False)
        before = [used.weight.detach().clone(), unused.weight.detach().clone()]
        used(torch.tensor([1, 4])).sum().backward()
        optimizer.step()
        schedule.step()
        assert torch.equal(unused.weight.detach(), before[1])
        assert torch.equal(used.weight.detach(), before[0]) == (step == 0)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_penalty_of_16_bit_tables_computes_in_float32(backend, dtype):
    # Computed in the table's dtype, each would miss by far more than the bound: in float16,
    # row 2's sum of squares (81,016) overflows and its n_j = 70000 is inf; in bfloat16, row 1's
    # sum of 1024 squares of 1 stalls at 256 (257 is not a bfloat16).
    weight = torch.ones(4, 1024, dtype=dtype)
    weight[2, :8] = 100.0
    weight.requires_grad_()
    ids, counts = torch.tensor([1, 2]), torch.tensor([1, 3, 70000, 1])
    value = din_fast.mba_penalty(weight, ids, counts, LAM, backend=backend)
    weight64 = weight.detach().double().requires_grad_()
    expected = R.mba_penalty(weight64, ids, counts, LAM)
    assert value.dtype == dtype
    assert_close(value, expected, dtype, "penalty")
    value.backward()
    expected.backward()
    assert_close(weight.grad, weight64.grad, dtype, "grad weight")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_counts_are_only_read_on_the_batch_rows(backend):
    # counts must be >= 1 only where the batch looks: a 0 elsewhere (FeatureCounter's
    # occurrences of an unseen id) changes neither the penalty nor its gradient, nor a step.
    weight = _table(5, 3, torch.float32).requires_grad_()
    ids, counts = torch.tensor([1, 3]), torch.tensor([0, 2, 0, 4, 0])
    value = din_fast.mba_penalty(weight, ids, counts, LAM, backend=backend)
    value.backward()
    expected = LAM * weight.detach().double()[[1, 3]] / torch.tensor([[2.0], [4.0]], dtype=torch.float64)
    assert_close(weight.grad[[1, 3]], expected, torch.float32, "grad on the batch rows")
    assert torch.equal(weight.grad[[0, 2, 4]], torch.zeros(3, 3))
    table = weight.detach().clone()
    grad = torch.zeros_like(table)
    grad[[1, 3]] = 1.0
    stepped = (R.mba_sgd_step(table.double(), grad.double(), ids, counts, lam=LAM, lr=LR) if backend == "reference"
               else mba_sgd_step_(table.clone(), grad, ids, counts, lam=LAM, lr=LR, backend=backend))
    assert torch.isfinite(stepped).all()
    assert torch.equal(stepped[[0, 2, 4]].to(table.dtype), table[[0, 2, 4]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_before_the_penalty_backward_never_yields_a_stale_gradient(backend):
    # A step between the penalty's forward and its backward: the backward either refuses (the
    # triton backend reads the table, whose version the step bumped, as any in-place op does)
    # or gives the gradient at the forward's weights (the torch backend saved its own copy).
    weight = _table(8, 3, torch.float32).requires_grad_()
    counts, ids = torch.ones(8), torch.tensor([1, 2])
    expected = torch.zeros(8, 3)
    expected[ids] = LAM * weight.detach()[ids]
    penalty = din_fast.mba_penalty(weight, ids, counts, LAM, backend=backend)
    with torch.no_grad():
        mba_sgd_fused_(weight, ids, torch.randn(2, 3), counts, lam=LAM, lr=LR, backend=backend)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            penalty.backward()
    else:
        penalty.backward()
        assert_close(weight.grad, expected.double(), torch.float32, "grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_column_table_of_any_column_stride(backend):
    weight = torch.randn(1, 8).t()  # [8, 1], strides (1, 8)
    expected = R.mba_sgd_step(weight.double(), torch.zeros(8, 1, dtype=torch.float64), torch.tensor([2, 5]),
                              torch.ones(8), lam=LAM, lr=LR)
    mba_sgd_step_(weight, torch.zeros(8, 1), torch.tensor([2, 5]), torch.ones(8), lam=LAM, lr=LR, backend=backend)
    assert_close(weight, expected, torch.float32, "table")


def test_fused_grad_rows_shape_checked():
    weight = _table(8, 3, torch.float32)
    before = weight.clone()
    with pytest.raises(ValueError, match="grad_rows must have shape"):
        mba_sgd_fused_(weight, torch.tensor([[1, 2]]), torch.randn(2, 4), torch.ones(8), lam=LAM, lr=LR)
    assert torch.equal(weight, before)


def test_optimizer_rejects_bad_tables_and_ids():
    embedding = nn.Embedding(6, 3)
    with pytest.raises(ValueError, match="counts must be >= 1"):
        MBASGD(embedding.parameters(), lr=LR, embeddings=[(embedding, torch.zeros(6))])
    with pytest.raises(ValueError, match=r"counts must have shape \[6\]"):
        MBASGD(embedding.parameters(), lr=LR, embeddings=[(embedding, torch.ones(5))])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        MBASGD(embedding.parameters(), lr=-1.0, embeddings=[(embedding, torch.ones(6))])
    with pytest.raises(ValueError, match=r"param group 0 has options MBASGD does not take: \['weight_decay'\]"):
        MBASGD([{"params": embedding.parameters(), "weight_decay": 0.5}], lr=LR,
               embeddings=[(embedding, torch.ones(6))])
    with pytest.raises(TypeError, match="ids must be a torch.Tensor"):
        din_fast.mba_penalty(embedding.weight, [1, 2], torch.ones(6), LAM)
    optimizer = MBASGD(embedding.parameters(), lr=LR, embeddings=[(embedding, torch.ones(6))], lam=LAM)
    with pytest.raises(ValueError, match="ids must lie in"):
        optimizer.record_ids(embedding, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="one of the tables"):
        optimizer.record_ids(nn.Embedding(6, 3), torch.tensor([0]))


@pytest.mark.parametrize("option,value,error,message", [
    ("lr", "0.1", TypeError, "param group 1: lr must be a float"),
    ("lr", -1.0, ValueError, "param group 1: lr must be >= 0"),
    ("lr", float("nan"), ValueError, "param group 1: lr must be >= 0"),
    ("lam", float("inf"), ValueError, "param group 1: lam must be finite"),
])
def test_bad_group_options_raise_before_any_write(option, value, error, message):
    # A group's lr or lam is checked where the group is given and again at each step, before
    # any table or parameter is written (a schedule may set it in between).
    embedding, head = nn.Embedding(6, 3), nn.Linear(3, 1)
    with pytest.raises(error, match=message):
        MBASGD([{"params": embedding.parameters()}, {"params": head.parameters(), option: value}], lr=LR,
               embeddings=[(embedding, torch.ones(6))], lam=LAM)
    optimizer = MBASGD([{"params": embedding.parameters()}], lr=LR, embeddings=[(embedding, torch.ones(6))], lam=LAM)
    with pytest.raises(error, match=message):
        optimizer.add_param_group({"params": head.parameters(), option: value})
    with pytest.raises(ValueError, match=r"param group 1 has options MBASGD does not take: \['momentum'\]"):
        optimizer.add_param_group({"params": head.parameters(), "momentum": 0.9})
    optimizer.add_param_group({"params": head.parameters()})
    optimizer.param_groups[1][option] = value
    head(embedding(torch.tensor([1, 2]))).sum().backward()
    before = [t.detach().clone() for t in (embedding.weight, head.weight, head.bias)]
    with pytest.raises(error, match=message):
        optimizer.step()
    for t, old in zip((embedding.weight, head.weight, head.bias), before):
        assert torch.equal(t.detach(), old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_parameters_step_as_plain_ones(backend):
    steps = []
    for named in (False, True):
        torch.manual_seed(0)
        embedding, head = nn.Embedding(6, 3), nn.Linear(3, 1)
        model = nn.ModuleDict(dict(embedding=embedding, head=head))
        params = model.named_parameters() if named else model.parameters()
        # The table left out of params gets a group of its own, named where the others are.
        optimizer = MBASGD([p for p in params if (p[1] if named else p) is not embedding.weight], lr=LR,
                           embeddings=[(embedding, _counts(6))], lam=LAM, backend=backend)
        head(embedding(torch.tensor([1, 4, 4]))).sum().backward()
        optimizer.step()
        steps.append([embedding.weight.detach(), head.weight.detach(), head.bias.detach()])
    for plain, named in zip(*steps):
        assert torch.equal(plain, named)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_shared_by_two_modules(backend):
    # Both modules record their lookups, so the rows either one used are stepped.
    first = nn.Embedding(8, 3)
    second = nn.Embedding(8, 3)
    second.weight = first.weight
    counts = _counts(8)
    before = first.weight.detach().clone()
    with pytest.raises(ValueError, match=r"embeddings\[1\] repeats a table given before with other counts"):
        MBASGD(first.parameters(), lr=LR, embeddings=[(first, counts), (second, counts + 1)], lam=LAM)
    optimizer = MBASGD(first.parameters(), lr=LR, embeddings=[(first, counts), (second, counts)], lam=LAM,
                       backend=backend)
    (first(torch.tensor([1, 2])).sum() + 2 * second(torch.tensor([2, 5])).sum()).backward()
    grad = first.weight.grad.clone()
    optimizer.step()
    expected = R.mba_sgd_step(before.double(), grad.double(), torch.tensor([1, 2, 5]), counts, lam=LAM, lr=LR)
    assert_close(first.weight, expected, torch.float32, "shared table after step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_off_the_recorded_rows_raises(backend):
    # The table also serves as a tied output layer: its gradient reaches rows no lookup used,
    # which an update of the looked-up rows alone would drop.
    embedding = nn.Embedding(6, 3)
    optimizer = MBASGD(embedding.parameters(), lr=LR, embeddings=[(embedding, torch.ones(6))], lam=LAM,
                       backend=backend)
    hidden = embedding(torch.tensor([1, 2])).sum(0)
    (hidden @ embedding.weight.t()).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(ValueError, match=r"embeddings\[0\] has a nonzero gradient on row 0, which no recorded"):
        optimizer.step()
    assert torch.equal(embedding.weight.detach(), before)


def test_regularizer_counts_keep_their_dtype():
    # n_j = 70000 is inf in float16 and 257 is 256 in bfloat16: the counts follow the module's
    # device, not its dtype.
    regularizer = din_fast.MBARegularizer(torch.tensor([1.0, 257.0, 70000.0]), LAM)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()):
        cast(regularizer)
        assert regularizer.counts.dtype == torch.float32
        assert regularizer.counts.tolist() == [1.0, 257.0, 70000.0]
    regularizer.to("meta")
    assert regularizer.counts.device.type == "meta" and regularizer.counts.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_of_zero_width(backend):
    weight, ids = torch.zeros(4, 0), torch.tensor([1, 3, 1])
    mba_sgd_fused_(weight, ids, torch.zeros(3, 0), torch.ones(4), lam=LAM, lr=LR, backend=backend)
    sparse = torch.sparse_coo_tensor(ids[None], torch.zeros(3, 0), (4, 0))
    mba_sgd_step_(weight, sparse, None, torch.ones(4), lam=LAM, lr=LR, backend=backend)
    mba_sgd_step_(weight, sparse, ids, torch.ones(4), lam=LAM, lr=LR, backend=backend)
    assert weight.shape == (4, 0)


# ----------------------------------------------------------------------------------------------
# Compile specs cover every launcher configuration
# ----------------------------------------------------------------------------------------------


def _table_type(signature):
    """The pointer type of a spec's table (or, summing the looked-up rows' gradients, of those)."""
    return signature["weight_ptr"] if "weight_ptr" in signature else signature["grad_rows_ptr"]


def test_aot_specs_cover_every_launcher_choice():
    covered = {(s["fn"], _table_type(s["signature"]), s["constexprs"]["BLOCK_D"]) for s in K.AOT_SPECS}
    kernels = (K._mba_penalty_forward_kernel, K._mba_penalty_backward_kernel, K._mba_sgd_dense_kernel,
               K._mba_segment_sum_kernel, K._mba_sgd_segment_kernel)
    for fn in kernels:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for dim in range(1, 300):
                assert (fn, "*" + K._TRITON_DTYPE[dtype], K._block_d(dim)) in covered
    dtypes = {"*" + name: dtype for dtype, name in K._TRITON_DTYPE.items()}
    for spec in K.AOT_SPECS:
        assert list(spec["signature"]) == spec["fn"].arg_names
        if "BLOCK_ROWS" in spec["constexprs"]:
            expected = K._block_rows(spec["constexprs"]["BLOCK_D"], dtypes[_table_type(spec["signature"])])
            assert spec["constexprs"]["BLOCK_ROWS"] == expected
