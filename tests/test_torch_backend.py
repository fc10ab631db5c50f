"""The torch backend against the float64 reference: outputs, running statistics and every gradient."""

import pytest
import torch

from din_fast import functional as F
from din_fast import reference as R
from din_fast import torch_ops
from din_fast.testing import (assert_close, assert_padding_is_zero, float64_copies, nan_filled_allocations,
                              random_attention_mlp, score_terms)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (B, T, D, hidden, lengths): D = 1, 18, 36, 64, 256; T = 1; lengths 0 and T, all 0; B = 1; one to
# three hidden layers.
ATTENTION_SHAPES = [
    (3, 5, 18, (80, 40), [5, 0, 2]),
    (1, 1, 36, (64, 16), [1]),
    (2, 1, 36, (200,), [0, 1]),
    (4, 7, 64, (80, 40), [7, 7, 3, 1]),
    (1, 6, 18, (200,), [6]),
    (3, 4, 36, (8, 5, 3), [0, 0, 0]),
    (3, 4, 36, (24, 10, 6), [4, 0, 2]),
    (2, 3, 1, (10,), [3, 1]),
    (2, 5, 256, (16, 8), [5, 2]),
]


def _leaves(weights, biases, act_params):
    """The tensors a gradient is expected for: weights, biases, PReLU slopes, Dice alphas and the
    affine Dice gates' weights and biases."""
    return list(weights) + list(biases) + [p for layer in act_params if layer for p in (layer[0], *layer[3:])]


def _attention_case(shape, activation, dtype, dice_affine=False):
    batch, seq_len, dim, hidden, lengths = shape
    weights, biases, act_params = random_attention_mlp(dim, hidden, activation, dtype, dice_affine=dice_affine)
    for t in _leaves(weights, biases, act_params):
        t.requires_grad_()
    query = torch.randn(batch, dim, dtype=dtype, requires_grad=True)
    keys = torch.randn(batch, seq_len, dim, dtype=dtype, requires_grad=True)
    return query, keys, weights, biases, act_params, torch.tensor(lengths)


def _dice_eps(dtype, training):
    """Dice's eps for a comparison in ``dtype``.

    Batch statistics over a few positions can have a variance near 0, and then ``1/sqrt(Var +
    eps)`` (up to 1e4 with the paper's eps of 1e-8) amplifies every rounding error: the float32
    result of any algorithm, the literal one included, is then noise. Such cases are checked
    with the paper's eps in float64, where the amplified rounding stays far below the tolerance,
    and with eps = 1e-3 (amplification at most ~30) in lower precision.
    """
    return 1e-8 if dtype == torch.float64 or not training else 1e-3


def _detached_leaves(tensors):
    """Copies in the same dtype, leaves requiring grad where the originals do (running statistics
    copied so that a second run does not see the first one's update)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.detach().clone().requires_grad_(tensors.requires_grad)
    return type(tensors)(_detached_leaves(t) for t in tensors)


def _cotangents(pooled, attn, dtype):
    """Random upstream gradients of pooled and weights, the same on every call: rounded through
    ``dtype``, so that the float64 reference gets the very same ones."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(out.dtype)
            for out in (pooled, attn)]


def _run(fn, query, keys, weights, biases, act_params, dtype=None, **kwargs):
    pooled, attn = fn(query, keys, weights, biases, act_params=act_params, **kwargs)
    # Random cotangents so that every output element's gradient path is exercised (dtype:
    # default keys').
    grad_pooled, grad_attn = _cotangents(pooled, attn, dtype or keys.dtype)
    loss = (pooled * grad_pooled).sum() + (attn * grad_attn).sum()
    leaves = [query, keys] + _leaves(weights, biases, act_params)
    grads = torch.autograd.grad(loss, leaves)
    return pooled, attn, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("normalization,softmax_scale", [("none", 1.0), ("softmax", 1.0), ("softmax", 1 / 6)])
@pytest.mark.parametrize("activation,training,dice_stats,dice_affine", [
    ("sigmoid", True, "valid", False), ("relu", True, "valid", False), ("prelu", True, "valid", False),
    ("dice", True, "valid", False), ("dice", True, "all", False), ("dice", False, "valid", False),
    ("dice", True, "all", True), ("dice", False, "valid", True),
])
def test_attention_pooling_matches_reference(dtype, shape, activation, normalization, softmax_scale, training,
                                             dice_stats, dice_affine):
    case = _attention_case(shape, activation, dtype, dice_affine)
    query, keys, weights, biases, act_params, lengths = case
    ref_query, ref_keys, ref_weights, ref_biases, ref_act = float64_copies(case[:5])
    options = dict(lengths=lengths, activation=activation, normalization=normalization,
                   softmax_scale=softmax_scale, dice_stats=dice_stats, training=training,
                   eps=_dice_eps(dtype, training))
    pooled, attn, grads = _run(torch_ops.attention_pooling, query, keys, weights, biases, act_params, **options)
    ref_pooled, ref_attn, ref_grads = _run(R.attention_pooling, ref_query, ref_keys, ref_weights, ref_biases,
                                           ref_act, dtype=query.dtype, **options)
    valid = torch.arange(keys.shape[1])[None, :] < lengths[:, None]
    _compare(dtype, (pooled, attn, *grads), (ref_pooled, ref_attn, *ref_grads), act_params, ref_act, keys, valid,
             normalization, softmax_scale)
    # Statistics over all positions carry gradient to the padding keys, and the query's with them.
    through_statistics = activation == "dice" and training and dice_stats == "all"
    assert_padding_is_zero(valid, pooled, attn, *((None, None) if through_statistics else grads[:2]))


def _compare(dtype, results, ref_results, act_params, ref_act, keys, valid, normalization="none",
             softmax_scale=1.0):
    """pooled, weights, every gradient and the running statistics against the reference's
    (``valid``: bool ``[B, T]``, the positions counted; the other options as given to ``_run``)."""
    grad_pooled, grad_attn = _cotangents(results[0], results[1], keys.dtype)
    # grads: query, keys, the weights and the biases of len(act_params) + 1 layers, ...
    layers = len(act_params) + 1
    score_layer = (f"gradient {layers + 1}", f"gradient {2 * layers + 1}")
    terms = score_terms(valid, grad_pooled, keys, grad_attn, ref_results[1], normalization, softmax_scale)
    for name, got, want in zip(["pooled", "weights"] + [f"gradient {i}" for i in range(len(results) - 2)],
                               results, ref_results):
        assert_close(got, want, dtype, name, terms=terms if name in score_layer else 0.0)
    for layer, ref_layer in zip(act_params, ref_act):
        for stat, ref_stat in zip(layer[1:3], ref_layer[1:3]):
            assert_close(stat, ref_stat, dtype, "running statistic")


def _mask_with_holes(batch, seq_len, num_valid):
    """bool ``[batch, seq_len]`` with exactly ``num_valid`` valid positions at random, none in
    row 1 (a sample with no valid position)."""
    others = torch.cat([torch.arange(seq_len), torch.arange(2 * seq_len, batch * seq_len)])
    mask = torch.zeros(batch * seq_len, dtype=torch.bool)
    mask[others[torch.randperm(others.numel())[:num_valid]]] = True
    return mask.view(batch, seq_len)


def _record_packing(monkeypatch):
    """Wraps ``torch_ops._mask_and_rows_to_pack`` (what decides between the fold and the packed
    rows); returns the list that gets one entry per call: whether it chose to pack."""
    decide, packed = torch_ops._mask_and_rows_to_pack, []

    def recording(valid):
        mask, rows = decide(valid)
        packed.append(rows is not None)
        return mask, rows

    monkeypatch.setattr(torch_ops, "_mask_and_rows_to_pack", recording)
    return packed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_valid,path", [(48, "folded"), (20, "packed")], ids=["folded", "packed"])
@pytest.mark.parametrize("activation,training", [("prelu", False), ("dice", True)])
def test_attention_pooling_bool_mask_with_holes(monkeypatch, dtype, num_valid, path, activation, training):
    """A bool mask with holes and an all-padding row against the float64 reference, outputs and
    every gradient. 48 of 60 positions valid (above ``PACK_MAX_VALID_FRACTION``) go through the
    per-sample fold with masking, 20 of 60 through the packed valid rows; the path taken is
    asserted, so that the cases cannot drift onto one path. Dice's attention always folds (its
    statistics are over the masked ``[B, T]`` positions) and packs nothing."""
    batch, seq_len, dim, hidden = 6, 10, 18, (12, 8)
    mask = _mask_with_holes(batch, seq_len, num_valid)
    assert not mask[1].any() and 0 < num_valid < batch * seq_len
    packed = _record_packing(monkeypatch)
    case = _attention_case((batch, seq_len, dim, hidden, [0] * batch), activation, dtype)
    query, keys, weights, biases, act_params, _ = case
    ref_query, ref_keys, ref_weights, ref_biases, ref_act = float64_copies(case[:5])
    options = dict(mask=mask, activation=activation, normalization="softmax", training=training,
                   eps=_dice_eps(dtype, training))
    pooled, attn, grads = _run(torch_ops.attention_pooling, query, keys, weights, biases, act_params, **options)
    assert packed == ([] if activation == "dice" else [path == "packed"])
    ref_results = _run(R.attention_pooling, ref_query, ref_keys, ref_weights, ref_biases, ref_act, dtype=dtype,
                       **options)
    ref_results = (ref_results[0], ref_results[1], *ref_results[2])
    _compare(dtype, (pooled, attn, *grads), ref_results, act_params, ref_act, keys, mask, "softmax")
    assert_padding_is_zero(mask, pooled, attn, *grads[:2])


def test_shared_prelu_slope():
    # One slope [1] for every channel of a layer, as nn.PReLU() has: its gradient sums them all.
    case = _attention_case((3, 5, 18, (12, 8), [5, 0, 2]), "prelu", torch.float32)
    query, keys, weights, biases, act_params, lengths = case
    act_params = [(torch.full((1,), 0.3, requires_grad=True),) for _ in act_params]
    ref_query, ref_keys, ref_weights, ref_biases, ref_act = float64_copies([query, keys, weights, biases, act_params])
    options = dict(lengths=lengths, activation="prelu", normalization="softmax")
    pooled, attn, grads = _run(torch_ops.attention_pooling, query, keys, weights, biases, act_params, **options)
    ref_pooled, ref_attn, ref_grads = _run(R.attention_pooling, ref_query, ref_keys, ref_weights, ref_biases,
                                           ref_act, dtype=query.dtype, **options)
    valid = torch.arange(keys.shape[1])[None, :] < lengths[:, None]
    _compare(torch.float32, (pooled, attn, *grads), (ref_pooled, ref_attn, *ref_grads), act_params, ref_act, keys,
             valid, options["normalization"])


@pytest.mark.parametrize("dice_stats", ["valid", "all"])
def test_dice_training_statistics_of_a_large_batch(dice_stats):
    # 16 x 200 positions: a statistic off by one position would show in float32.
    lengths = torch.randint(0, 201, (16,))
    case = _attention_case((16, 200, 18, (16, 8), lengths.tolist()), "dice", torch.float32)
    query, keys, weights, biases, act_params, lengths = case
    ref_query, ref_keys, ref_weights, ref_biases, ref_act = float64_copies(case[:5])
    options = dict(lengths=lengths, activation="dice", normalization="none", training=True, dice_stats=dice_stats,
                   eps=1e-3)
    pooled, attn, grads = _run(torch_ops.attention_pooling, query, keys, weights, biases, act_params, **options)
    ref_pooled, ref_attn, ref_grads = _run(R.attention_pooling, ref_query, ref_keys, ref_weights, ref_biases,
                                           ref_act, dtype=query.dtype, **options)
    valid = torch.arange(keys.shape[1])[None, :] < lengths[:, None]
    _compare(torch.float32, (pooled, attn, *grads), (ref_pooled, ref_attn, *ref_grads), act_params, ref_act, keys,
             valid, options["normalization"])


@pytest.mark.parametrize("activation,dice_affine", [("sigmoid", False), ("dice", False)])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_every_allocation_filled_with_nan_first(activation, dice_affine, normalization):
    # Every buffer the torch backend allocates with torch.empty* starts as NaN (signed integers
    # as -1), forward and backward: an element left unwritten would reach an output.
    with nan_filled_allocations():
        test_attention_pooling_matches_reference(torch.float32, ATTENTION_SHAPES[0], activation, normalization,
                                                 0.5, True, "valid", dice_affine)
        test_attention_pooling_matches_reference(torch.float32, ATTENTION_SHAPES[3], activation, normalization,
                                                 0.5, True, "valid", dice_affine)
        test_score_candidates_matches_reference(torch.float32, activation, dice_affine, normalization, 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,dice_affine", [("sigmoid", False), ("relu", False), ("prelu", False),
                                                    ("dice", False), ("dice", True)])
@pytest.mark.parametrize("normalization,softmax_scale", [("none", 1.0), ("softmax", 1.0), ("softmax", 0.4)])
def test_score_candidates_matches_reference(dtype, activation, dice_affine, normalization, softmax_scale):
    weights, biases, act_params = random_attention_mlp(36, (80, 40), activation, dtype, dice_affine=dice_affine)
    history, candidates = torch.randn(9, 36, dtype=dtype), torch.randn(5, 36, dtype=dtype)
    options = dict(activation=activation, normalization=normalization, softmax_scale=softmax_scale)
    pooled, attn = torch_ops.score_candidates(history, candidates, weights, biases, act_params=act_params, **options)
    ref = R.score_candidates(*float64_copies([history, candidates, weights, biases]),
                             act_params=float64_copies(act_params), **options)
    assert_close(pooled, ref[0], dtype, "pooled")
    assert_close(attn, ref[1], dtype, "weights")


@pytest.mark.parametrize("block_rows", [1, 20])
@pytest.mark.parametrize("activation,dice_affine", [("sigmoid", False), ("prelu", False), ("dice", True)])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_score_candidates_in_blocks_matches_reference(monkeypatch, block_rows, activation, dice_affine,
                                                      normalization):
    """The candidates in blocks of one (``BLOCK_ROWS`` below T = 9) and of two with a last block
    of one (5 candidates, 20 // 9 = 2 per block) against the float64 reference."""
    monkeypatch.setattr(torch_ops, "BLOCK_ROWS", block_rows)
    test_score_candidates_matches_reference(torch.float32, activation, dice_affine, normalization, 0.5)


@pytest.mark.parametrize("activation,dice_affine", [("sigmoid", False), ("dice", True)])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_score_candidates_with_an_empty_history(activation, dice_affine, normalization):
    """T = 0: every candidate pools nothing (zeros ``[C, D]``, weights ``[C, 0]``), as in the
    reference."""
    weights, biases, act_params = random_attention_mlp(36, (80, 40), activation, dice_affine=dice_affine)
    history, candidates = torch.randn(0, 36), torch.randn(5, 36)
    options = dict(activation=activation, normalization=normalization)
    pooled, attn = torch_ops.score_candidates(history, candidates, weights, biases, act_params=act_params, **options)
    ref = R.score_candidates(*float64_copies([history, candidates, weights, biases]),
                             act_params=float64_copies(act_params), **options)
    assert pooled.shape == (5, 36) and attn.shape == (5, 0)
    assert torch.equal(pooled, torch.zeros_like(pooled))
    assert_close(pooled, ref[0], torch.float32, "pooled")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (1, 3), (6, 4, 80), (2, 1, 40)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [False, True])
def test_dice_matches_reference(dtype, shape, masked, training, affine):
    channels = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    alpha = torch.rand(channels, dtype=dtype, requires_grad=True)
    stats = [0.1 * torch.randn(channels, dtype=dtype), 0.5 + torch.rand(channels, dtype=dtype)]
    gate = [(1 + 0.8 * torch.randn(channels, dtype=dtype)).requires_grad_(),
            (0.3 * torch.randn(channels, dtype=dtype)).requires_grad_()] if affine else [None, None]
    mask = torch.rand(shape[:-1]) > 0.4 if masked else None
    ref_x, ref_alpha, ref_stats = float64_copies([x, alpha, stats])
    ref_gate = float64_copies(gate) if affine else gate
    eps = _dice_eps(dtype, training)
    y = torch_ops.dice(x, alpha, *stats, mask, training=training, momentum=0.3, eps=eps, weight=gate[0],
                       bias=gate[1])
    ref_y = R.dice(ref_x, ref_alpha, *ref_stats, mask, training=training, momentum=0.3, eps=eps,
                   weight=ref_gate[0], bias=ref_gate[1])
    cotangent = torch.randn(shape, dtype=torch.float64)
    leaves = [x, alpha] + (gate if affine else [])
    ref_leaves = [ref_x, ref_alpha] + (ref_gate if affine else [])
    grads = torch.autograd.grad((y * cotangent.to(dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_y * cotangent).sum(), ref_leaves)
    assert_close(y, ref_y, dtype, "y")
    for name, g, ref_g in zip(["dx", "dalpha", "dweight", "dbias"], grads, ref_grads):
        assert_close(g, ref_g, dtype, name)
    assert_close(stats[0], ref_stats[0], dtype, "running_mean")
    assert_close(stats[1], ref_stats[1], dtype, "running_var")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["large batch", "one valid row"])
def test_dice_16_bit_inputs_compute_statistics_in_float32(backend, dtype, case):
    # 70,000 rows: a float16 count or sum of squares overflows; one valid row: its variance is 0,
    # and eps = 1e-8 rounds to 0 in float16. The float64 reference sees the same rounded inputs.
    rows = 70_000 if case == "large batch" else 4
    x = (2 * torch.randn(rows, 3)).to(dtype).requires_grad_()
    alpha = torch.rand(3, dtype=dtype, requires_grad=True)
    stats = [torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)]
    mask = None if case == "large batch" else torch.tensor([False, True, False, False])
    ref_x, ref_alpha, ref_stats = float64_copies([x, alpha, stats])
    y = F.dice(x, alpha, *stats, mask, training=True, backend=backend)
    ref_y = R.dice(ref_x, ref_alpha, *ref_stats, mask, training=True)
    cotangent = torch.randn(rows, 3, dtype=torch.float64)
    grads = torch.autograd.grad((y * cotangent.to(dtype)).sum(), [x, alpha])
    ref_grads = torch.autograd.grad((ref_y * cotangent).sum(), [ref_x, ref_alpha])
    assert y.dtype == dtype
    assert_close(y, ref_y, dtype, "y")
    for name, g, ref_g in zip(["dx", "dalpha"], grads, ref_grads):
        assert_close(g, ref_g, dtype, name)
    for stat, ref_stat in zip(stats, ref_stats):
        assert_close(stat, ref_stat, dtype, "running statistic")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dice_output_dtype_follows_x_and_inference_keeps_no_buffer(backend, dtype):
    x = torch.randn(6, 3, dtype=dtype, requires_grad=True)
    alpha, weight, bias = torch.rand(3), torch.ones(3), torch.zeros(3)
    stats = [torch.zeros(3), torch.ones(3)]
    y_eval = F.dice(x, alpha, *stats, training=False, weight=weight, bias=bias, backend=backend)
    assert y_eval.dtype == dtype
    # A training step updates the buffers in place; the inference graph must not hold them.
    F.dice(x, alpha, *stats, training=True, weight=weight, bias=bias, backend=backend)
    (grad,) = torch.autograd.grad(y_eval.float().sum(), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mba_penalty_matches_reference(dtype):
    weight = torch.randn(50, 18, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 50, (8, 11))
    counts = torch.randint(1, 100, (50,))
    ref_weight = float64_copies(weight)
    value = torch_ops.mba_penalty(weight, ids, counts, 0.7)
    ref_value = R.mba_penalty(ref_weight, ids, counts, 0.7)
    assert_close(value, ref_value, dtype, "penalty")
    assert_close(torch.autograd.grad(value, weight)[0], torch.autograd.grad(ref_value, ref_weight)[0], dtype,
                 "gradient")


@pytest.mark.parametrize("activation,dice_affine", [("sigmoid", False), ("relu", False), ("prelu", False),
                                                    ("dice", False), ("dice", True)])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_gradcheck_torch_attention(activation, dice_affine, normalization):
    query, keys, weights, biases, act_params, lengths = _attention_case((3, 4, 3, (5, 2), [4, 1, 0]),
                                                                    activation, torch.float64, dice_affine)
    leaves = _leaves(weights, biases, act_params)
    n = len(weights)
    per_layer = 3 if dice_affine else 1

    def fn(query, keys, *flat):
        ws, bs, own = flat[:n], flat[n:2 * n], flat[2 * n:]
        trainable = [own[i:i + per_layer] for i in range(0, len(own), per_layer)]
        acts = [(p[0],) + tuple(layer[1:3]) + tuple(p[1:]) for p, layer in zip(trainable, act_params)] \
            if own else act_params
        return torch_ops.attention_pooling(query, keys, ws, bs, lengths=lengths, activation=activation,
                                           act_params=acts, normalization=normalization, softmax_scale=0.6,
                                           training=True, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (query, keys, *leaves))


def test_gradcheck_torch_dice_and_mba():
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x, a: torch_ops.dice(x, a, None, None, mask, training=True, eps=1e-3), (x, alpha))
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    ids, counts = torch.tensor([6, 0, 6]), torch.arange(1, 8)
    assert torch.autograd.gradcheck(lambda w: torch_ops.mba_penalty(w, ids, counts, 0.5), (weight,))


def test_score_candidates_folds_the_first_layer():
    """The serving path's first layer is the history's product with the candidates' folds:
    C * T * D * H1 multiply-adds plus C * D * H1 for the candidates' own terms, never
    C * T * 4D * H1."""
    weights, biases, _ = random_attention_mlp(36, (80, 40), "sigmoid")
    history, candidates = torch.randn(100, 36), torch.randn(200, 36)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as folded:
        torch_ops.score_candidates(history, candidates, weights, biases)
    with FlopCounterMode(display=False) as naive:
        R.score_candidates(history, candidates, weights, biases)
    layer_one_naive = 2 * 200 * 100 * 144 * 80
    layer_one_folded = 2 * (200 * 100 * 36 * 80 + 200 * 36 * 80)
    rest = 2 * 200 * 100 * (80 * 40 + 40)
    assert naive.get_total_flops() == layer_one_naive + rest + 2 * 200 * 100 * 36
    assert folded.get_total_flops() == layer_one_folded + rest + 2 * 200 * 100 * 36


def test_functional_api_dispatches_to_torch_backend():
    query, keys, weights, biases, act_params, lengths = _attention_case(ATTENTION_SHAPES[0], "relu", torch.float64)
    direct = torch_ops.attention_pooling(query, keys, weights, biases, lengths=lengths, activation="relu")
    dispatched = F.attention_pooling(query, keys, weights, biases, lengths=lengths, activation="relu",
                                     backend="torch")
    for a, b in zip(direct, dispatched):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("block_rows", [torch_ops.BLOCK_ROWS, 7, 13])
def test_packed_and_folded_first_layers_agree(monkeypatch, activation, normalization, block_rows):
    """The same batch through the per-sample fold (nothing packed) and through the packed valid
    positions, both against the float64 reference, outputs and every gradient; in one block, and
    in blocks of one sample or two (fold) and of 7 or 13 rows that split samples (packed)."""
    monkeypatch.setattr(torch_ops, "BLOCK_ROWS", block_rows)
    shape = (5, 6, 18, (16, 8), [6, 0, 3, 1, 5])
    case = _attention_case(shape, activation, torch.float64)
    options = dict(lengths=case[5], activation=activation, normalization=normalization, softmax_scale=0.5)
    expected = _run(R.attention_pooling, *_detached_leaves(case[:5]), **options)
    for fraction in (0.0, 1.0):
        monkeypatch.setattr(torch_ops, "PACK_MAX_VALID_FRACTION", fraction)
        pooled, attn, grads = _run(torch_ops.attention_pooling, *_detached_leaves(case[:5]), **options)
        for i, (value, ref) in enumerate(zip([pooled, attn, *grads], [expected[0], expected[1], *expected[2]])):
            assert_close(value, ref, torch.float64, f"fraction {fraction}, output {i}")


def test_row_blocks_are_cache_sized_on_the_cpu_and_one_on_a_gpu():
    # 4096 // 100 = 40 samples of T = 100 per block on the CPU; on a GPU each block costs a dozen
    # launches, so all rows go at once.
    assert torch_ops._row_blocks(100, 100, None, torch.device("cpu")) == [(0, 40), (40, 80), (80, 100)]
    assert torch_ops._row_blocks(100, 100, None, torch.device("cuda")) == [(0, 100)]
    packed = torch.arange(5000)
    assert torch_ops._row_blocks(100, 100, packed, torch.device("cuda")) == [(0, 5000)]
    assert torch_ops._row_blocks(0, 100, None, torch.device("cuda")) == []


@pytest.mark.parametrize("valid", ["lengths", "mask", "all"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("activation,training,autocast_backward", [
    ("sigmoid", False, False), ("relu", False, False), ("prelu", False, False),
    ("sigmoid", False, True), ("relu", False, True), ("prelu", False, True),
    ("dice", True, False), ("dice", False, False),
])
def test_attention_pooling_under_autocast_computes_as_without_it(activation, training, autocast_backward,
                                                                 normalization, valid):
    """Under bfloat16 autocast, float32 inputs give the very float32 outputs, running statistics
    and gradients that they give outside it. Lengths 1, 5, 3 of 5 pack the valid rows; the mask,
    one hole in 15 positions, goes through the fold with masking, and every position valid
    through the fold alone. The pointwise activations' hand-written backward is also called
    under autocast; Dice's attention is differentiated by autograd, whose backward of PyTorch's
    own ops follows the autocast state it is called in (PyTorch advises against that)."""
    case = _attention_case((3, 5, 18, (12, 8), [1, 5, 3]), activation, torch.float32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2] = False
    options = dict(activation=activation, normalization=normalization, softmax_scale=0.5, training=training,
                   **{"lengths": dict(lengths=case[5]), "mask": dict(mask=mask), "all": {}}[valid])

    def forward_under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_ops.attention_pooling(*args, **kwargs)

    expected_leaves, leaves = _detached_leaves(case[:5]), _detached_leaves(case[:5])
    expected = _run(torch_ops.attention_pooling, *expected_leaves, **options)
    if autocast_backward:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results = _run(torch_ops.attention_pooling, *leaves, **options)
    else:
        results = _run(forward_under_autocast, *leaves, **options)
    statistics, expected_statistics = ([stat for layer in act_params for stat in layer[1:3]]
                                       for act_params in (leaves[4], expected_leaves[4]))
    for name, value, want in zip(["pooled", "weights", "gradients", "running statistics"],
                                 [*results, statistics], [*expected, expected_statistics]):
        torch.testing.assert_close(value, want, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_score_candidates_under_autocast_computes_as_without_it(activation, normalization):
    """Serving under bfloat16 autocast: float32 inputs give the very float32 outputs they give
    outside it."""
    weights, biases, act_params = random_attention_mlp(18, (12, 8), activation)
    history, candidates = torch.randn(9, 18), torch.randn(5, 18)
    options = dict(act_params=act_params, activation=activation, normalization=normalization)
    expected = torch_ops.score_candidates(history, candidates, weights, biases, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = torch_ops.score_candidates(history, candidates, weights, biases, **options)
    torch.testing.assert_close(results, expected, atol=0, rtol=0)


@pytest.mark.parametrize("op", [torch_ops.attention_pooling, R.attention_pooling], ids=["torch", "reference"])
@pytest.mark.parametrize("valid", ["lengths", "mask", "all"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("activation,training,dice_stats,dice_affine", [
    ("sigmoid", False, "valid", False), ("relu", False, "valid", False), ("prelu", False, "valid", False),
    ("dice", True, "valid", False), ("dice", True, "all", True), ("dice", False, "valid", False),
])
def test_attention_pooling_of_empty_sequences(op, activation, training, dice_stats, dice_affine, normalization,
                                              valid):
    """Keys ``[B, 0, D]``: pooled zeros ``[B, D]``, weights ``[B, 0]`` and every gradient exactly 0,
    nothing depending on the query or the MLP. Dice's batch statistics are those of an empty
    batch, which leaves the running ones as they were."""
    case = _attention_case((3, 0, 18, (12, 8), [0, 0, 0]), activation, torch.float64, dice_affine)
    query, keys, weights, biases, act_params, lengths = case
    running = [stat.clone() for layer in act_params for stat in layer[1:3]]
    options = dict(activation=activation, normalization=normalization, training=training, dice_stats=dice_stats,
                   **{"lengths": dict(lengths=lengths), "mask": dict(mask=torch.ones(3, 0, dtype=torch.bool)),
                      "all": {}}[valid])
    pooled, attn, grads = _run(op, query, keys, weights, biases, act_params, **options)
    zeros = [query.new_zeros(3, 18), query.new_zeros(3, 0)] + [
        torch.zeros_like(leaf) for leaf in [query, keys] + _leaves(weights, biases, act_params)]
    for name, value, want in zip(["pooled", "weights"] + [f"gradient {i}" for i in range(len(grads))],
                                 [pooled, attn, *grads], zeros):
        torch.testing.assert_close(value, want, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    assert all(torch.equal(stat, before) for stat, before in
               zip([stat for layer in act_params for stat in layer[1:3]], running))
