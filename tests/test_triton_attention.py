"""The fused attention kernels (kernels/attention.py, din_fast/triton_ops/attention.py) against
the float64 reference: pooled output, weights and every gradient, under Triton's interpreter
(set by conftest) or natively on a GPU."""

import random

import pytest
import torch

import din_fast
from din_fast import functional, reference
from din_fast._attention_shapes import KERNEL_ENVELOPE, kernel_unsupported
from din_fast.testing import (KERNEL_DEVICE, assert_close, assert_padding_is_zero, nan_filled, nan_filled_allocations,
                              score_terms)

triton = pytest.importorskip("triton")

from din_fast.kernels import attention as kernels  # noqa: E402
from din_fast.triton_ops import attention as triton_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("on_kernel_device")


def randn(*shape):
    """float32 normal samples drawn on the CPU, then moved to ``KERNEL_DEVICE``: a seed gives the
    same inputs on a GPU as in the interpreter, so a GPU failure replays on the CPU."""
    return torch.randn(*shape, device="cpu").to(KERNEL_DEVICE)


def rand(*shape):
    """Uniform samples on [0, 1), drawn like ``randn``."""
    return torch.rand(*shape, device="cpu").to(KERNEL_DEVICE)


def make_mlp(dim, hidden, activation, dtype, prelu_shared=False, affine=False):
    """Random MLP parameters (nn.Linear layout) and per-layer activation parameters (Dice: alpha,
    running mean and variance, and with ``affine`` the gate's weight and bias)."""
    sizes = [4 * dim, *hidden, 1]
    weights = [(randn(out, inp) / inp ** 0.5).to(dtype) for inp, out in zip(sizes, sizes[1:])]
    biases = [(0.1 * randn(out)).to(dtype) for out in sizes[1:]]
    if activation == "prelu":
        act_params = [((0.5 * rand(1 if prelu_shared else h)).to(dtype),) for h in hidden]
    elif activation == "dice":
        act_params = [(rand(h).to(dtype), (0.3 * randn(h)).to(dtype),
                       (0.5 + rand(h)).to(dtype)) for h in hidden]
        if affine:
            act_params = [layer + ((1.0 + 0.5 * randn(h)).to(dtype),
                                   (0.3 * randn(h)).to(dtype))
                          for layer, h in zip(act_params, hidden)]
    else:
        act_params = [() for _ in hidden]
    return weights, biases, act_params


def trainable(activation, act_params):
    """The differentiable activation parameters: prelu weights, dice alpha and the affine gate's
    weight and bias (running statistics are buffers)."""
    if activation == "dice":
        return [p for layer in act_params for j, p in enumerate(layer) if j not in (1, 2)]
    return [layer[0] for layer in act_params] if activation == "prelu" else []


def trainable_names(activation, act_params):
    if activation == "dice":
        return [f"act_params[{i}][{j}]" for i, layer in enumerate(act_params) for j in range(len(layer))
                if j not in (1, 2)]
    return [f"act_params[{i}][0]" for i in range(len(act_params))] if activation == "prelu" else []


def compare_with_reference(reference_fn, inputs, weights, biases, outputs, dtype, act_params=(), **options):
    """``outputs`` (pooled, weights) against ``reference_fn`` run in float64 on the same inputs,
    MLP and activation parameters (no gradients)."""
    expected = reference_fn(*(t.double() for t in inputs), [w.double() for w in weights],
                            [b.double() for b in biases],
                            act_params=[tuple(p.double() for p in layer) for layer in act_params], **options)
    for name, got, want in zip(("pooled", "weights"), outputs, expected):
        assert_close(got, want, dtype, name)


def run_and_compare(batch, seq_len, dim, hidden, *, activation="sigmoid", normalization="none", softmax_scale=1.0,
                    dtype=torch.float32, lengths=None, mask=None, prelu_shared=False, api="functional",
                    grad_scale=1.0, affine=False, training=False, dice_stats="valid", momentum=0.1):
    """Runs the triton backend and the float64 reference on the same inputs and upstream
    gradients, and compares pooled, weights, the gradient of every input and parameter and (Dice
    in training) the updated running statistics."""
    query = randn(batch, dim).to(dtype)
    keys = randn(batch, seq_len, dim).to(dtype)
    weights, biases, act_params = make_mlp(dim, hidden, activation, dtype, prelu_shared, affine)
    leaves = [query, keys, *weights, *biases, *trainable(activation, act_params)]
    for t in leaves:
        t.requires_grad_(True)

    def f64(t):
        return t.detach().to(torch.float64).requires_grad_(t.requires_grad)

    # Copied before the triton run: in training it updates the running statistics in place.
    ref_leaves = [f64(t) for t in leaves]
    n = len(weights)
    ref_weights, ref_biases = ref_leaves[2:2 + n], ref_leaves[2 + n:2 + 2 * n]
    ref_trainable = iter(ref_leaves[2 + 2 * n:])
    ref_act = [tuple(f64(p) if activation == "dice" and j in (1, 2) else next(ref_trainable)
                     for j, p in enumerate(layer)) for layer in act_params]

    options = dict(lengths=lengths, mask=mask, activation=activation, act_params=act_params,
                   normalization=normalization, softmax_scale=softmax_scale, training=training,
                   dice_stats=dice_stats, momentum=momentum)
    if api == "functional":
        pooled, attn = functional.attention_pooling(query, keys, weights, biases, backend="triton", **options)
    else:
        pooled, attn = triton_attention.attention_pooling(query, keys, weights, biases, **options)
    grad_pooled = randn(*pooled.shape).to(pooled.dtype)
    grad_attn = randn(*attn.shape).to(attn.dtype)
    grads = torch.autograd.grad((pooled * grad_pooled).sum() + (attn * grad_attn).sum(), leaves)

    ref_options = dict(options, act_params=ref_act)
    ref_pooled, ref_attn = reference.attention_pooling(ref_leaves[0], ref_leaves[1], ref_weights, ref_biases,
                                                       **ref_options)
    ref_grads = torch.autograd.grad((ref_pooled * grad_pooled.double()).sum() + (ref_attn * grad_attn.double()).sum(),
                                    ref_leaves)
    assert pooled.dtype == dtype and attn.dtype == dtype
    assert_close(pooled, ref_pooled, dtype, "pooled")
    assert_close(attn, ref_attn, dtype, "weights")
    names = ["query", "keys"] + [f"weights[{i}]" for i in range(n)] + [f"biases[{i}]" for i in range(n)] + \
        trainable_names(activation, act_params)
    assert len(names) == len(leaves)
    valid = (mask if mask is not None else torch.arange(seq_len)[None, :] < lengths[:, None]
             if lengths is not None else torch.ones(batch, seq_len, dtype=torch.bool))
    terms = score_terms(valid, grad_pooled, keys, grad_attn, ref_attn, normalization, softmax_scale)
    for name, got, want, leaf in zip(names, grads, ref_grads, leaves):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        score_layer = name in (f"weights[{n - 1}]", f"biases[{n - 1}]")
        assert_close(got, want, dtype, f"grad {name}", scale=grad_scale, terms=terms if score_layer else 0.0)
    if activation == "dice":
        for i, (layer, ref_layer) in enumerate(zip(act_params, ref_act)):
            assert_close(layer[1], ref_layer[1], dtype, f"running_mean[{i}]")
            assert_close(layer[2], ref_layer[2], dtype, f"running_var[{i}]")
    if lengths is not None or mask is not None:
        # Statistics over all positions carry gradient to the padding keys, and the query's with them.
        through_statistics = activation == "dice" and training and dice_stats == "all"
        assert_padding_is_zero(valid, pooled, attn, *((None, None) if through_statistics else grads[:2]))
    return pooled, attn, grads


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("normalization,softmax_scale", [("none", 1.0), ("softmax", 1.0), ("softmax", 0.37)])
def test_activations_and_normalizations(activation, normalization, softmax_scale):
    lengths = torch.tensor([5, 0, 3])
    run_and_compare(3, 5, 18, (20, 12), activation=activation, normalization=normalization,
                    softmax_scale=softmax_scale, lengths=lengths)


@pytest.mark.parametrize("hidden", [(80, 40), (64, 16), (200,), (24, 10, 6)])
def test_hidden_layouts(hidden):
    run_and_compare(2, 7, 36, hidden, activation="prelu", normalization="softmax", softmax_scale=0.5,
                    lengths=torch.tensor([7, 4]))


@pytest.mark.parametrize("dim", [1, 18, 36])
def test_odd_embedding_sizes(dim):
    run_and_compare(2, 3, dim, (10,), activation="sigmoid", normalization="none",
                    lengths=torch.tensor([3, 2]))


def test_long_sequence_spans_several_tiles():
    # 40 positions cross two 32-row forward tiles and three 16-row backward tiles; the online
    # softmax rescales across them.
    run_and_compare(2, 40, 18, (16, 8), activation="relu", normalization="softmax",
                    lengths=torch.tensor([40, 21]))


def test_paper_shape_with_dice_inference():
    # D = 36, hidden (80, 40) as in the paper; 70 positions span several tiles of both kernels.
    run_and_compare(2, 70, 36, (80, 40), activation="dice", normalization="softmax", softmax_scale=1 / 6,
                    lengths=torch.tensor([70, 33]))


def test_single_position_and_single_sample():
    run_and_compare(1, 1, 18, (12, 6), activation="sigmoid", normalization="softmax")
    run_and_compare(1, 1, 18, (12, 6), activation="prelu", normalization="none")


def test_no_lengths_means_all_valid():
    run_and_compare(2, 4, 18, (12,), activation="relu", normalization="none")


def test_bool_mask_with_holes():
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, False],
                         [False, True, False, False, True]])
    run_and_compare(3, 5, 18, (12, 8), activation="prelu", normalization="softmax", mask=mask)
    run_and_compare(3, 5, 18, (12, 8), activation="sigmoid", normalization="none", mask=mask)


def test_shared_prelu_weight():
    run_and_compare(2, 4, 18, (12, 8), activation="prelu", normalization="none", prelu_shared=True,
                    lengths=torch.tensor([4, 1]))


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_all_padding_gives_zero_output_and_zero_gradients(normalization):
    pooled, attn, grads = run_and_compare(2, 4, 18, (12,), activation="sigmoid", normalization=normalization,
                                          lengths=torch.zeros(2, dtype=torch.long))
    assert torch.equal(pooled, torch.zeros_like(pooled)) and torch.equal(attn, torch.zeros_like(attn))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_len,hidden,activation,normalization,affine", [
    (5, (12, 8), "prelu", "softmax", False),
    (5, (12, 8), "relu", "none", False),
    (5, (12, 8), "sigmoid", "none", False),
    (40, (16, 8), "dice", "softmax", False),  # Dice on running statistics, across tiles
    (5, (12,), "dice", "none", True),
    (1, (24, 10, 6), "prelu", "softmax", False),  # every score-layer gradient exactly 0
    (1, (24, 10, 6), "prelu", "none", False),
])
def test_half_precision_inputs(dtype, seq_len, hidden, activation, normalization, affine):
    run_and_compare(3, seq_len, 18, hidden, activation=activation, normalization=normalization, affine=affine,
                    dtype=dtype, lengths=torch.tensor([seq_len, 0, 1]))


def test_half_precision_mask_with_holes():
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, False],
                         [False, True, False, False, True]])
    run_and_compare(3, 5, 18, (12, 8), activation="sigmoid", normalization="softmax", dtype=torch.bfloat16,
                    mask=mask)


def test_longest_sequence():
    # T = 4096, the longest length the launch rules name: 128 forward and 256 backward tiles.
    run_and_compare(2, 4096, 8, (8,), activation="sigmoid", normalization="softmax",
                    lengths=torch.tensor([4096, 1000]))


@pytest.mark.parametrize("case", ["sigmoid", "relu softmax across tiles", "dice training, 3 layers", "bfloat16 prelu",
                                  "all lengths 0"])
def test_every_allocation_filled_with_nan_first(case):
    # Every buffer the launchers allocate with torch.empty* starts as NaN (signed integers as -1),
    # forward and backward: an element left unwritten would reach an output or a gradient.
    lengths = {"relu softmax across tiles": [40, 21], "all lengths 0": [0, 0]}.get(case, [5, 0])
    options = {
        "sigmoid": dict(seq_len=5, hidden=(20, 12), activation="sigmoid"),
        "relu softmax across tiles": dict(seq_len=40, hidden=(16, 8), activation="relu", normalization="softmax"),
        "dice training, 3 layers": dict(seq_len=5, hidden=(40, 12, 6), activation="dice", normalization="softmax",
                                        training=True, affine=True),
        "bfloat16 prelu": dict(seq_len=5, hidden=(12, 8), activation="prelu", normalization="softmax",
                               dtype=torch.bfloat16),
        "all lengths 0": dict(seq_len=4, hidden=(12,), activation="sigmoid", normalization="softmax"),
    }[case]
    seq_len = options.pop("seq_len")
    hidden = options.pop("hidden")
    with nan_filled_allocations():
        run_and_compare(2, seq_len, 18, hidden, lengths=torch.tensor(lengths), **options)


def test_direct_triton_op_call():
    run_and_compare(2, 3, 18, (12,), activation="dice", normalization="softmax", api="triton_ops",
                    lengths=torch.tensor([1, 3]))


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_lengths_out_of_range_act_clamped_where_unchecked(normalization):
    # Under torch.compile the range check cannot read lengths; the kernels then take them clamped
    # to [0, T], as the reference's mask does, never reading or writing past a sample. A strided
    # int32 lengths tensor is read element by element, not as contiguous memory.
    lengths = torch.tensor([9, 0, -40, 0, 2, 0], dtype=torch.int32)[::2]
    run_and_compare(3, 5, 18, (12, 8), normalization=normalization, api="triton_ops", lengths=lengths)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_launcher_writes_every_element_of_nan_filled_outputs(normalization):
    batch, seq_len, dim, hidden = 3, 37, 18, (12, 8)
    query = randn(batch, dim)
    keys = randn(batch, seq_len, dim)
    weights, biases, act_params = make_mlp(dim, hidden, "sigmoid", torch.float32)
    lengths = torch.tensor([37, 0, 5])
    mlp = kernels.FoldedMLP(weights, biases, [() for _ in hidden])
    span = kernels.sequence_span(batch, seq_len, lengths, None, KERNEL_DEVICE)
    pooled = nan_filled((batch, dim), torch.float32, KERNEL_DEVICE)
    attn = nan_filled((batch, seq_len), torch.float32, KERNEL_DEVICE)
    kernels.attention_forward(query, keys, mlp, span, None, normalization=normalization, activation="sigmoid",
                              softmax_scale=0.8, pooled=pooled, weights=attn)
    compare_with_reference(reference.attention_pooling, (query, keys), weights, biases, (pooled, attn), torch.float32,
                           lengths=lengths, normalization=normalization, softmax_scale=0.8)


@pytest.mark.parametrize("activation,normalization,affine,dtype", [
    ("sigmoid", "none", False, torch.float32), ("relu", "softmax", False, torch.float32),
    ("prelu", "softmax", False, torch.float32), ("dice", "softmax", False, torch.float32),
    ("dice", "none", True, torch.float32), ("sigmoid", "softmax", False, torch.bfloat16),
])
def test_score_candidates_matches_reference(activation, normalization, affine, dtype):
    seq_len, num_candidates, dim, hidden = 6, 5, 18, (12, 8)
    history = randn(seq_len, dim).to(dtype)
    candidates = randn(num_candidates, dim).to(dtype)
    weights, biases, act_params = make_mlp(dim, hidden, activation, dtype, affine=affine)
    options = dict(activation=activation, act_params=act_params, normalization=normalization, softmax_scale=0.6)
    with nan_filled_allocations():
        pooled, attn = functional.score_candidates(history, candidates, weights, biases, backend="triton",
                                                   **options)
    assert pooled.shape == (num_candidates, dim) and attn.shape == (num_candidates, seq_len)
    assert pooled.dtype == dtype and attn.dtype == dtype
    compare_with_reference(reference.score_candidates, (history, candidates), weights, biases, (pooled, attn), dtype,
                           **options)


def test_score_candidates_single_position_and_single_candidate():
    history, candidates = randn(1, 18), randn(1, 18)
    weights, biases, _ = make_mlp(18, (12, 8), "sigmoid", torch.float32)
    pooled, attn = functional.score_candidates(history, candidates, weights, biases, normalization="softmax",
                                               backend="triton")
    compare_with_reference(reference.score_candidates, (history, candidates), weights, biases, (pooled, attn),
                           torch.float32, normalization="softmax")


def test_score_candidates_with_a_transposed_history():
    seq_len, num_candidates, dim, hidden = 7, 4, 18, (12, 8)
    history = randn(dim, seq_len).t()
    candidates = randn(num_candidates, dim)
    weights, biases, _ = make_mlp(dim, hidden, "sigmoid", torch.float32)
    pooled, attn = functional.score_candidates(history, candidates, weights, biases, backend="triton")
    compare_with_reference(reference.score_candidates, (history, candidates), weights, biases, (pooled, attn),
                           torch.float32)


def test_keys_whose_offsets_overflow_int32_are_made_contiguous():
    # The kernels form a position's offset t * stride in int32: a view whose offsets within a
    # sample (or whose batch stride) pass 2**31 - 1 is copied first. Meta tensors: strides only.
    def keys(*strides):
        return torch.empty_strided((2, 3, 8), strides, device="meta")

    assert triton_attention._indexable(keys(24, 8, 1))
    assert triton_attention._indexable(keys(0, 8, 1))
    assert not triton_attention._indexable(keys(24, 8, 2))
    assert not triton_attention._indexable(keys(8, 2 ** 30, 1))
    assert not triton_attention._indexable(keys(2 ** 31, 8, 1))
    # A sample of 2**31 elements or more is a shape the kernels do not take: "auto" uses torch.
    query, long_keys = torch.empty(1, 64, device="meta"), torch.empty(1, 2 ** 25, 64, device="meta")
    weights, biases = [torch.empty(8, 256, device="meta"), torch.empty(1, 8, device="meta")], \
        [torch.empty(8, device="meta"), torch.empty(1, device="meta")]
    with pytest.raises(NotImplementedError, match=r"keys with T \* D >= 2147483648 \(T=33554432, D=64\)"):
        functional.attention_pooling(query, long_keys, weights, biases, backend="triton")


def test_float64_is_refused():
    query, keys = randn(2, 18).double(), randn(2, 3, 18).double()
    weights, biases, _ = make_mlp(18, (12,), "sigmoid", torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        functional.attention_pooling(query, keys, weights, biases, backend="triton")


@pytest.mark.parametrize("edge", [bound for bounds in KERNEL_ENVELOPE.values() for bound in bounds])
def test_the_largest_shapes_the_kernels_take_match_the_reference(edge):
    # Each number of hidden layers at the edge of the gated envelope: D and every width at their
    # largest, unpadded, in training Dice (every pass of the kernels); backend="triton" would
    # refuse a shape outside the envelope.
    dim, hidden = edge[0], edge[1:]
    run_and_compare(2, 3, dim, hidden, activation="dice", normalization="softmax", training=True,
                    lengths=torch.tensor([3, 2]))


@pytest.mark.parametrize("dim,hidden,pattern", [
    (257, (8,), r"D=257 with hidden widths \(8,\) \(with 1 hidden layer the attention kernels take D <= 256 "
                r"with widths up to 256\)"),
    (8, (8, 8, 8, 8), "4 hidden layers"),
    (8, (129, 8), r"hidden widths \(129, 8\) \(with 2 hidden layers the attention kernels take D <= 256 with "
                  r"widths up to 128, 64\)"),
    (8, (8, 65), r"hidden widths \(8, 65\)"),
    (36, (200, 80, 40), r"hidden widths \(200, 80, 40\) \(with 3 hidden layers the attention kernels take "
                        r"D <= 256 with widths up to 128, 64, 32\)"),
    (8, (8, 8, 33), r"hidden widths \(8, 8, 33\)"),
])
def test_shapes_outside_the_kernels_are_refused_by_name_and_run_on_torch(dim, hidden, pattern):
    query, keys = randn(2, dim), randn(2, 3, dim)
    weights, biases, _ = make_mlp(dim, hidden, "sigmoid", torch.float32)
    with pytest.raises(NotImplementedError, match=pattern):
        functional.attention_pooling(query, keys, weights, biases, backend="triton")
    with pytest.raises(NotImplementedError, match=pattern):
        functional.score_candidates(keys[0], query, weights, biases, backend="triton")
    with pytest.raises(NotImplementedError, match=pattern):
        kernels.FoldedMLP(weights, biases, [() for _ in hidden])
    outputs = functional.attention_pooling(query, keys, weights, biases, backend="auto")
    compare_with_reference(reference.attention_pooling, (query, keys), weights, biases, outputs, torch.float32)


def test_torch_compile_traces_without_graph_breaks():
    query = randn(2, 18).requires_grad_()
    keys = randn(2, 5, 18)
    weights, biases, _ = make_mlp(18, (12, 8), "sigmoid", torch.float32)
    lengths = torch.tensor([5, 2])

    def loss(q):
        pooled, attn = triton_attention.attention_pooling(q, keys, weights, biases, lengths=lengths,
                                                          normalization="softmax")
        return pooled.sum() + (attn * attn).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(query)
    (grad,) = torch.autograd.grad(got, query)
    want = loss(query)
    (want_grad,) = torch.autograd.grad(want, query)
    assert_close(got, want.double(), torch.float32, "loss")
    assert_close(grad, want_grad.double(), torch.float32, "grad query")


@pytest.mark.parametrize("activation,training,transposed,dtype,normalization", [
    ("sigmoid", False, False, torch.float32, "softmax"), ("dice", True, False, torch.float32, "softmax"),
    ("sigmoid", False, True, torch.float32, "softmax"), ("sigmoid", False, False, torch.bfloat16, "softmax"),
    ("sigmoid", False, False, torch.float32, "none")])
def test_custom_ops_pass_opcheck(activation, training, transposed, dtype, normalization):
    # bfloat16 with softmax: the forward's pooled and weights are fp32 (output_dtype), fakes too.
    # test_aot_dispatch_dynamic compares every output of two runs: one left unwritten fails it.
    query = randn(2, 18).to(dtype)
    keys = randn(2, 4, 18).to(dtype)
    weights, biases, act_params = make_mlp(18, (12, 6), activation, dtype, affine=training)
    if transposed:
        # The gradients are contiguous whatever the inputs' strides; the fake kernels say so too.
        query = query.t().contiguous().t()
        weights = [w.t().contiguous().t() for w in weights]
    act_flat = [p for layer in act_params for p in layer]
    args = (query, keys, weights, biases, torch.tensor([4, 1]), None, act_flat, activation, normalization,
            1.0, 1e-8, training, "valid")
    torch.library.opcheck(torch.ops.din_fast.attention_pooling_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    outputs = torch.ops.din_fast.attention_pooling_fwd(*args)
    upstream = tuple(randn(*out.shape).to(out.dtype) for out in outputs[:2])
    backward_args = args[:7] + tuple(outputs) + upstream + args[7:]
    torch.library.opcheck(torch.ops.din_fast.attention_pooling_bwd.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_backward_of_an_inference_forward_after_the_statistics_moved():
    # Dice in inference reads the running statistics, which a training forward then updates in
    # place: the earlier graph's backward uses the values its forward used.
    pool = din_fast.AttentionPooling(4, (6, 4), activation="dice", backend="triton")
    expected_pool = din_fast.AttentionPooling(4, (6, 4), activation="dice", backend="reference", dtype=torch.float64)
    expected_pool.load_state_dict(pool.state_dict())
    query, keys = randn(2, 4), randn(2, 3, 4)
    grads = []
    for module, cast in ((pool, torch.float32), (expected_pool, torch.float64)):
        q = query.to(cast).requires_grad_()
        inference = module.eval()(q, keys.to(cast))
        training = module.train()(q, keys.to(cast))
        grads.append(torch.autograd.grad(inference.sum() + training.sum(), q)[0])
    assert_close(grads[0], grads[1], torch.float32, "grad query")


@pytest.mark.parametrize("activation,normalization", [("sigmoid", "none"), ("dice", "softmax")])
def test_autocast_does_not_apply(activation, normalization):
    # The host-side products around the kernels (the query's share of the first layer, the
    # weight sums) would run in bfloat16 under autocast: the results must be those outside it.
    pool = din_fast.AttentionPooling(8, (6, 4), activation=activation, normalization=normalization,
                                     backend="triton").eval()
    query, keys, lengths = randn(3, 8).requires_grad_(), randn(3, 5, 8), torch.tensor([5, 0, 2])
    history, candidates = randn(5, 8), randn(4, 8)
    results = []
    for autocast in (False, True):
        with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16, enabled=autocast):
            pooled = pool(query, keys, lengths)
            (grad_query,) = torch.autograd.grad(pooled.sum(), query)
            served = pool.score_candidates(history, candidates)
        results.append((pooled, grad_query, served))
    for outside, inside in zip(*results):
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, outside, atol=0, rtol=0)


def test_aot_specs_cover_every_option():
    names = {spec["name"] for spec in kernels.AOT_SPECS}
    for dtype in ("float32", "bfloat16", "float16"):
        for activation in [*kernels.ACTIVATION_CODES, "dice_affine"]:
            for normalization in kernels.NORMALIZATION_CODES:
                tag = f"{dtype}_d36_h80x40_{activation}_{normalization}"
                assert any(n.startswith(f"din_attention_bwd_{tag}_p") for n in names)
                assert any(n.startswith(f"din_attention_bwd_{tag}_mask_p") for n in names)
                assert any(n.startswith(f"din_attention_fwd_{tag}_t") for n in names)
                if activation.startswith("dice"):
                    for mask in ("", "_mask"):
                        for suffix in ("train_p0s1", "train_p0s2", "train_p1", "train_p2", "train_p3"):
                            assert f"din_attention_bwd_{tag}{mask}_{suffix}" in names
                        for layer in (1, 2):
                            assert any(n.startswith(f"din_attention_fwd_{dtype}_d36_h80x40_{activation}_none{mask}"
                                                    f"_stats{layer}_t") for n in names)
    for spec in kernels.AOT_SPECS:
        assert set(spec["signature"]) == set(spec["fn"].arg_names)
        assert all(spec["signature"][name] == "constexpr" for name in spec["constexprs"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_launches_take_the_gated_pointer_types(monkeypatch, dtype, normalization):
    # Every launch (forward, Dice statistics passes, backward) passes tensors of the element
    # types the compile gate's spec of the same configuration declares: the gate compiled the
    # very variant that runs.
    type_names = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
                  torch.uint8: "*u8"}
    specs = {(spec["fn"], spec["signature"]["keys_ptr"], tuple(sorted(spec["constexprs"].items()))): spec
             for spec in kernels._aot_specs([(18, (12, 8))])}
    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.kernel, args, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_din_attention_fwd_kernel", "_din_attention_bwd_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(getattr(kernels, name)))
    run_and_compare(2, 5, 18, (12, 8), activation="dice", normalization=normalization, training=True, dtype=dtype,
                    api="triton_ops", lengths=torch.tensor([5, 2]))
    assert len(launched) >= 3
    mismatches = []
    for kernel, args, kwargs in launched:
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "maxnreg", "num_stages")}
        spec = specs[(kernel, type_names[dtype], tuple(sorted(constexprs.items())))]
        mismatches += [(spec["name"], arg_name, type_names[value.dtype], spec["signature"][arg_name])
                       for arg_name, value in zip(kernel.arg_names, args)
                       if isinstance(value, torch.Tensor) and type_names[value.dtype] != spec["signature"][arg_name]]
    assert not mismatches


# ----------------------------------------------------------------------------------------------
# Dice with batch statistics (training) and the affine gate
# ----------------------------------------------------------------------------------------------


MASK_WITH_HOLES = [[True, False, True, True, False], [False, False, False, False, False],
                   [False, True, False, False, True]]


@pytest.mark.parametrize("dice_stats", ["valid", "all"])
@pytest.mark.parametrize("hidden,affine,normalization,valid", [
    ((40,), False, "none", "lengths"),          # H1 = 40, one layer: dz1 through the scratch tile
    ((20, 12), True, "softmax", "lengths"),     # H1 = 20: the backward's layer 1 in H1 chunks
    ((12, 8, 6), True, "softmax", "mask"),
    ((10, 6, 5), False, "none", "mask"),
    ((9, 7), True, "none", "neither"),
])
def test_dice_training(dice_stats, hidden, affine, normalization, valid):
    lengths = torch.tensor([5, 0, 3]) if valid == "lengths" else None
    mask = torch.tensor(MASK_WITH_HOLES) if valid == "mask" else None
    run_and_compare(3, 5, 18, hidden, activation="dice", normalization=normalization, softmax_scale=0.7,
                    lengths=lengths, mask=mask, affine=affine, training=True, dice_stats=dice_stats, momentum=0.3)


@pytest.mark.parametrize("dice_stats", ["valid", "all"])
def test_dice_training_single_position_and_single_sample(dice_stats):
    # T = 1 with an empty sample; B = 1 over several positions; B = T = 1 (one position counts:
    # variance 0, the gate sits at its bias).
    run_and_compare(3, 1, 18, (12, 6), activation="dice", normalization="softmax", training=True,
                    dice_stats=dice_stats, lengths=torch.tensor([1, 0, 1]), api="triton_ops")
    run_and_compare(1, 4, 18, (12, 6), activation="dice", normalization="none", training=True, affine=True,
                    dice_stats=dice_stats, lengths=torch.tensor([3]), api="triton_ops")
    run_and_compare(1, 1, 18, (12, 6), activation="dice", normalization="none", training=True, affine=True,
                    dice_stats=dice_stats, api="triton_ops")
    # One counted position under three layers whose H1 = 28 the backward takes in 16-wide chunks:
    # its second layer's sums round otherwise than the statistics pass's one product, and
    # rsqrt(eps) magnified that at each layer above (the keys' gradient was off by 0.28 here;
    # without softmax and with the position last of five, the query's by 7.7e8).
    run_and_compare(1, 5, 16, (28, 25, 14), activation="dice", normalization="softmax", training=True,
                    affine=True, dice_stats=dice_stats, lengths=torch.tensor([1]), api="triton_ops")


def test_dice_training_with_a_tiny_batch_variance():
    # Three positions count, and a first-layer channel's batch variance is 1.8e-5 (rstd about
    # 240). Without re-centring z - mean over the kept positions, the kernels missed the float32
    # bound by 10x here (the first layer's bias).
    torch.manual_seed(534)
    run_and_compare(1, 4, 18, (12, 6), activation="dice", normalization="none", training=True, affine=True,
                    dice_stats="valid", lengths=torch.tensor([3]), api="triton_ops")


def test_dice_training_with_no_valid_position_leaves_running_statistics():
    # dice_stats="valid" over an all-padding batch: nothing to count, running statistics
    # untouched (run_and_compare checks them against the reference), output and gradients 0.
    pooled, attn, grads = run_and_compare(2, 3, 18, (12, 6), activation="dice", normalization="softmax",
                                          training=True, affine=True, api="triton_ops",
                                          lengths=torch.zeros(2, dtype=torch.long))
    assert torch.equal(pooled, torch.zeros_like(pooled)) and torch.equal(attn, torch.zeros_like(attn))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dice_stats", ["valid", "all"])
def test_dice_training_paper_shape_across_tiles(dice_stats):
    # D = 36 (the fp32 forward's D chunks), hidden (80, 40), 37 positions: three backward tiles,
    # two forward tiles, moments merged across tiles and samples.
    run_and_compare(2, 37, 36, (80, 40), activation="dice", normalization="softmax", softmax_scale=1 / 6,
                    training=True, dice_stats=dice_stats, affine=dice_stats == "all", api="triton_ops",
                    lengths=torch.tensor([37, 20]))


def test_dice_training_wide_embedding_narrow_first_layer():
    # fp32 with D > 64 and H1 <= 64: phases 2 and 3 take the whole first layer at once (HC = H1P)
    # while the summing passes and phase 1 work in H1 chunks.
    run_and_compare(2, 5, 72, (40, 12), activation="dice", normalization="softmax", training=True, affine=True,
                    api="triton_ops", lengths=torch.tensor([5, 3]))


@pytest.mark.parametrize("activation,training", [("sigmoid", False), ("dice", True)])
def test_three_layers_in_first_layer_chunks(activation, training):
    # fp32, three hidden layers, D < DP: the fold in 16-wide D chunks; phase 1 (and Dice's
    # training phase 1) on 32-wide H1 chunks, phase 2 and the summing passes on 16-wide ones.
    run_and_compare(3, 5, 18, (40, 12, 6), activation=activation, normalization="softmax", softmax_scale=0.5,
                    training=training, api="triton_ops", lengths=torch.tensor([5, 0, 3]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dice_training_half_precision(dtype):
    run_and_compare(3, 5, 18, (12, 8), activation="dice", normalization="softmax", dtype=dtype, training=True,
                    affine=True, dice_stats="all", api="triton_ops", lengths=torch.tensor([5, 2, 0]))


@pytest.mark.parametrize("activation,training,dtype", [("sigmoid", False, torch.float16),
                                                       ("dice", True, torch.bfloat16)])
def test_half_precision_widest_embedding_in_chunks(activation, training, dtype):
    # D = 200 pads to 256: 16-bit forwards (and Dice's statistics passes) build the fold in
    # 32-wide D chunks instead of holding it, as fp32 does.
    # No softmax: it makes the score bias's gradient exactly 0, where 16-bit rounding is all
    # that is left to compare.
    run_and_compare(2, 5, 200, (12, 8), activation=activation, normalization="none", dtype=dtype,
                    training=training, api="triton_ops", lengths=torch.tensor([5, 3]))


@pytest.mark.parametrize("hidden", [(20, 12), (12,)])
def test_affine_dice_inference(hidden):
    run_and_compare(3, 5, 18, hidden, activation="dice", normalization="softmax", affine=True,
                    lengths=torch.tensor([5, 0, 3]))


@pytest.mark.parametrize("dice_stats", ["valid", "all"])
def test_dice_statistics_launcher_then_forward_into_nan_filled_outputs(dice_stats):
    # The kernel-level path: one statistics pass per layer, each using the layers below with
    # their batch statistics, then the forward into NaN-filled buffers.
    batch, seq_len, dim, hidden = 3, 21, 18, (12, 8)
    query = randn(batch, dim)
    keys = randn(batch, seq_len, dim)
    weights, biases, act_params = make_mlp(dim, hidden, "dice", torch.float32)
    lengths = torch.tensor([21, 0, 6])
    ref_act = [tuple(p.double() for p in layer) for layer in act_params]
    ref_pooled, ref_attn = reference.attention_pooling(
        query.double(), keys.double(), [w.double() for w in weights], [b.double() for b in biases], lengths=lengths,
        activation="dice", act_params=ref_act, normalization="softmax", dice_stats=dice_stats, training=True)
    mlp = kernels.FoldedMLP(weights, biases, [() for _ in hidden])
    span = kernels.sequence_span(batch, seq_len, lengths, None, KERNEL_DEVICE)
    stat_span = span if dice_stats == "valid" else torch.full_like(span, seq_len)
    valid = torch.arange(seq_len)[None, :] < lengths[:, None]
    ref_stat_mask = valid if dice_stats == "valid" else None
    h = reference.attention_features(query.double(), keys.double())
    for layer, (alpha, _, _) in enumerate(act_params):
        mean, var, count = kernels.dice_layer_statistics(query, keys, mlp, stat_span, None, layer)
        h = torch.nn.functional.linear(h, weights[layer].double(), biases[layer].double())
        ref_mean, ref_var, ref_count = reference.dice_statistics(h, ref_stat_mask)
        assert_close(mean, ref_mean, torch.float32, f"mean[{layer}]")
        assert_close(var, ref_var, torch.float32, f"var[{layer}]")
        assert count.item() == ref_count.item()
        h = reference.dice(h, alpha.double(), None, None, ref_stat_mask, training=True)
        rstd = torch.rsqrt(var + 1e-8)
        mlp.set_act_vectors(layer, (alpha, mean, rstd))
    pooled = nan_filled((batch, dim), torch.float32, KERNEL_DEVICE)
    attn = nan_filled((batch, seq_len), torch.float32, KERNEL_DEVICE)
    kernels.attention_forward(query, keys, mlp, span, None, normalization="softmax", activation="dice",
                              softmax_scale=1.0, pooled=pooled, weights=attn)
    assert_close(pooled, ref_pooled, torch.float32, "pooled")
    assert_close(attn, ref_attn, torch.float32, "weights")


def test_dice_training_traces_without_graph_breaks():
    query = randn(2, 18).requires_grad_()
    keys = randn(2, 5, 18)
    weights, biases, act_params = make_mlp(18, (12, 8), "dice", torch.float32, affine=True)
    lengths = torch.tensor([5, 2])
    eager_params = [tuple(p.clone() for p in layer) for layer in act_params]
    initial_means = [layer[1].clone() for layer in act_params]

    def loss(q, params):
        pooled, attn = triton_attention.attention_pooling(q, keys, weights, biases, lengths=lengths,
                                                          activation="dice", act_params=params, training=True,
                                                          normalization="softmax")
        return pooled.sum() + (attn * attn).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(query, act_params)
    (grad,) = torch.autograd.grad(got, query)
    want = loss(query, eager_params)
    (want_grad,) = torch.autograd.grad(want, query)
    assert_close(got, want.double(), torch.float32, "loss")
    assert_close(grad, want_grad.double(), torch.float32, "grad query")
    # The compiled graph updated the running statistics in place, as the eager call did.
    for layer, eager_layer, initial_mean in zip(act_params, eager_params, initial_means):
        assert not torch.equal(layer[1], initial_mean)
        assert_close(layer[1], eager_layer[1].double(), torch.float32, "running_mean")
        assert_close(layer[2], eager_layer[2].double(), torch.float32, "running_var")


def random_configuration(seed):
    """``((B, T, D, hidden), options)`` for ``run_and_compare``, drawn from ``seed`` within the
    kernels' shapes: one to three hidden layers of random widths, D from 1 to 100, T from 1 to
    70 (one tile or several), every activation and normalization, Dice in training or not with
    either statistics, all positions or lengths (0 and T among them) or a random mask, float32
    mostly and 16-bit inputs."""
    rng = random.Random(seed)
    while True:
        layers = rng.choice([1, 2, 2, 3])
        hidden = tuple(rng.randint(1, width) for width in ((96,) if layers == 1 else (128, 64, 32)[:layers]))
        dim = rng.choice([1, 2, 3, 7, 8, 16, 17, 36, 64, 100])
        if not kernel_unsupported(dim, list(hidden)):
            break
    batch, seq_len = rng.randint(1, 5), rng.choice([1, 2, 5, 16, 17, 33, 64, 70])
    activation = rng.choice(["sigmoid", "relu", "prelu", "dice", "dice"])
    options = dict(activation=activation, normalization=rng.choice(["none", "softmax"]),
                   softmax_scale=rng.choice([1.0, 0.37, 2.5]),
                   dtype=rng.choice([torch.float32] * 4 + [torch.bfloat16, torch.float16]))
    valid = rng.choice(["all", "lengths", "mask"])
    if valid == "lengths":
        options["lengths"] = torch.tensor([rng.choice([0, seq_len, rng.randint(0, seq_len)]) for _ in range(batch)])
    elif valid == "mask":
        density = rng.random()
        options["mask"] = torch.tensor([[rng.random() < density for _ in range(seq_len)] for _ in range(batch)])
    if activation == "prelu":
        options["prelu_shared"] = rng.random() < 0.3
    if activation == "dice":
        options.update(affine=rng.random() < 0.5, training=rng.random() < 0.5,
                       dice_stats=rng.choice(["valid", "all"]))
    return (batch, seq_len, dim, hidden), options


@pytest.mark.parametrize("seed", range(16))
def test_random_configurations(seed):
    """Configurations drawn at random from fixed seeds (``random_configuration``): the options'
    combinations the other tests do not pick one by one."""
    shape, options = random_configuration(seed)
    torch.manual_seed(seed)
    run_and_compare(*shape, **options)
