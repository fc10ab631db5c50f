"""The fused attention kernels (kernels/attention.py, din_fast/triton_ops/attention.py) against
the float64 reference: pooled output, weights and every gradient, under Triton's interpreter
(set by conftest) or natively on a GPU."""

import pytest
import torch

from din_fast import functional, reference
from din_fast.testing import assert_close, nan_filled

triton = pytest.importorskip("triton")

from din_fast.kernels import attention as kernels  # noqa: E402
from din_fast.triton_ops import attention as triton_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_mlp(dim, hidden, activation, dtype, prelu_shared=False):
    """Random MLP parameters (nn.Linear layout) and per-layer activation parameters."""
    sizes = [4 * dim, *hidden, 1]
    weights = [(torch.randn(out, inp, device=DEVICE) / inp ** 0.5).to(dtype) for inp, out in zip(sizes, sizes[1:])]
    biases = [(0.1 * torch.randn(out, device=DEVICE)).to(dtype) for out in sizes[1:]]
    if activation == "prelu":
        act_params = [((0.5 * torch.rand(1 if prelu_shared else h, device=DEVICE)).to(dtype),) for h in hidden]
    elif activation == "dice":
        act_params = [(torch.rand(h, device=DEVICE).to(dtype), (0.3 * torch.randn(h, device=DEVICE)).to(dtype),
                       (0.5 + torch.rand(h, device=DEVICE)).to(dtype)) for h in hidden]
    else:
        act_params = [() for _ in hidden]
    return weights, biases, act_params


def trainable(activation, act_params):
    """The differentiable activation parameters: prelu weights, dice alpha (running statistics
    are buffers)."""
    return [layer[0] for layer in act_params] if activation in ("prelu", "dice") else []


def run_and_compare(batch, seq_len, dim, hidden, *, activation="sigmoid", normalization="none", softmax_scale=1.0,
                    dtype=torch.float32, lengths=None, mask=None, prelu_shared=False, api="functional",
                    grad_scale=1.0):
    """Runs the triton backend and the float64 reference on the same inputs and upstream
    gradients, and compares pooled, weights and the gradient of every input and parameter."""
    query = torch.randn(batch, dim, device=DEVICE).to(dtype)
    keys = torch.randn(batch, seq_len, dim, device=DEVICE).to(dtype)
    weights, biases, act_params = make_mlp(dim, hidden, activation, dtype, prelu_shared)
    leaves = [query, keys, *weights, *biases, *trainable(activation, act_params)]
    for t in leaves:
        t.requires_grad_(True)
    options = dict(lengths=lengths, mask=mask, activation=activation, act_params=act_params,
                   normalization=normalization, softmax_scale=softmax_scale, training=False)
    if api == "functional":
        pooled, attn = functional.attention_pooling(query, keys, weights, biases, backend="triton", **options)
    else:
        pooled, attn = triton_attention.attention_pooling(query, keys, weights, biases, **options)
    grad_pooled = torch.randn_like(pooled)
    grad_attn = torch.randn_like(attn)
    grads = torch.autograd.grad((pooled * grad_pooled).sum() + (attn * grad_attn).sum(), leaves)

    def f64(t):
        return t.detach().to(torch.float64).requires_grad_(t.requires_grad)

    ref_leaves = [f64(t) for t in leaves]
    n = len(weights)
    ref_weights, ref_biases = ref_leaves[2:2 + n], ref_leaves[2 + n:2 + 2 * n]
    ref_trainable = iter(ref_leaves[2 + 2 * n:])
    ref_act = [tuple(next(ref_trainable) if j == 0 else f64(p) for j, p in enumerate(layer)) for layer in act_params]
    ref_options = dict(options, act_params=ref_act)
    ref_pooled, ref_attn = reference.attention_pooling(ref_leaves[0], ref_leaves[1], ref_weights, ref_biases,
                                                       **ref_options)
    ref_grads = torch.autograd.grad((ref_pooled * grad_pooled.double()).sum() + (ref_attn * grad_attn.double()).sum(),
                                    ref_leaves)
    assert pooled.dtype == dtype and attn.dtype == dtype
    assert_close(pooled, ref_pooled, dtype, "pooled")
    assert_close(attn, ref_attn, dtype, "weights")
    names = ["query", "keys"] + [f"weights[{i}]" for i in range(n)] + [f"biases[{i}]" for i in range(n)] + \
        [f"act_params[{i}][0]" for i in range(len(leaves) - 2 - 2 * n)]
    for name, got, want, leaf in zip(names, grads, ref_grads, leaves):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        assert_close(got, want, dtype, f"grad {name}", scale=grad_scale)
    return pooled, attn, grads


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("normalization,softmax_scale", [("none", 1.0), ("softmax", 1.0), ("softmax", 0.37)])
def test_activations_and_normalizations(activation, normalization, softmax_scale):
    lengths = torch.tensor([5, 0, 3], device=DEVICE)
    run_and_compare(3, 5, 18, (20, 12), activation=activation, normalization=normalization,
                    softmax_scale=softmax_scale, lengths=lengths)


@pytest.mark.parametrize("hidden", [(80, 40), (64, 16), (200,), (24, 10, 6)])
def test_hidden_layouts(hidden):
    run_and_compare(2, 7, 36, hidden, activation="prelu", normalization="softmax", softmax_scale=0.5,
                    lengths=torch.tensor([7, 4], device=DEVICE))


@pytest.mark.parametrize("dim", [1, 18, 36])
def test_odd_embedding_sizes(dim):
    run_and_compare(2, 3, dim, (10,), activation="sigmoid", normalization="none",
                    lengths=torch.tensor([3, 2], device=DEVICE))


def test_long_sequence_spans_several_tiles():
    # 40 positions cross two 32-row forward tiles and three 16-row backward tiles; the online
    # softmax rescales across them.
    run_and_compare(2, 40, 18, (16, 8), activation="relu", normalization="softmax",
                    lengths=torch.tensor([40, 21], device=DEVICE))


def test_paper_shape_with_dice_inference():
    # D = 36, hidden (80, 40) as in the paper; 70 positions span several tiles of both kernels.
    run_and_compare(2, 70, 36, (80, 40), activation="dice", normalization="softmax", softmax_scale=1 / 6,
                    lengths=torch.tensor([70, 33], device=DEVICE))


def test_single_position_and_single_sample():
    run_and_compare(1, 1, 18, (12, 6), activation="sigmoid", normalization="softmax")
    run_and_compare(1, 1, 18, (12, 6), activation="prelu", normalization="none")


def test_no_lengths_means_all_valid():
    run_and_compare(2, 4, 18, (12,), activation="relu", normalization="none")


def test_bool_mask_with_holes():
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, False],
                         [False, True, False, False, True]], device=DEVICE)
    run_and_compare(3, 5, 18, (12, 8), activation="prelu", normalization="softmax", mask=mask)
    run_and_compare(3, 5, 18, (12, 8), activation="sigmoid", normalization="none", mask=mask)


def test_shared_prelu_weight():
    run_and_compare(2, 4, 18, (12, 8), activation="prelu", normalization="none", prelu_shared=True,
                    lengths=torch.tensor([4, 1], device=DEVICE))


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_all_padding_gives_zero_output_and_zero_gradients(normalization):
    pooled, attn, grads = run_and_compare(2, 4, 18, (12,), activation="sigmoid", normalization=normalization,
                                          lengths=torch.zeros(2, dtype=torch.long, device=DEVICE))
    assert torch.equal(pooled, torch.zeros_like(pooled)) and torch.equal(attn, torch.zeros_like(attn))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    run_and_compare(2, 5, 18, (12, 8), activation="prelu", normalization="softmax", dtype=dtype,
                    lengths=torch.tensor([5, 2], device=DEVICE))


def test_direct_triton_op_call():
    run_and_compare(2, 3, 18, (12,), activation="dice", normalization="softmax", api="triton_ops",
                    lengths=torch.tensor([1, 3], device=DEVICE))


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_launcher_writes_every_element_of_nan_filled_outputs(normalization):
    batch, seq_len, dim, hidden = 3, 37, 18, (12, 8)
    query = torch.randn(batch, dim, device=DEVICE)
    keys = torch.randn(batch, seq_len, dim, device=DEVICE)
    weights, biases, act_params = make_mlp(dim, hidden, "sigmoid", torch.float32)
    lengths = torch.tensor([37, 0, 5], device=DEVICE)
    mlp = kernels.FoldedMLP(weights, biases, [() for _ in hidden])
    span = kernels.sequence_span(batch, seq_len, lengths, None, DEVICE)
    pooled = nan_filled((batch, dim), torch.float32, DEVICE)
    attn = nan_filled((batch, seq_len), torch.float32, DEVICE)
    kernels.attention_forward(query, keys, mlp, span, None, normalization=normalization, activation="sigmoid",
                              softmax_scale=0.8, pooled=pooled, weights=attn)
    ref_pooled, ref_attn = reference.attention_pooling(query.double(), keys.double(), [w.double() for w in weights],
                                                       [b.double() for b in biases], lengths=lengths,
                                                       normalization=normalization, softmax_scale=0.8)
    assert_close(pooled, ref_pooled, torch.float32, "pooled")
    assert_close(attn, ref_attn, torch.float32, "weights")


@pytest.mark.parametrize("activation,normalization", [("sigmoid", "none"), ("dice", "softmax"), ("prelu", "softmax")])
def test_score_candidates_matches_reference(activation, normalization):
    seq_len, num_candidates, dim, hidden = 6, 5, 18, (12, 8)
    history = torch.randn(seq_len, dim, device=DEVICE)
    candidates = torch.randn(num_candidates, dim, device=DEVICE)
    weights, biases, act_params = make_mlp(dim, hidden, activation, torch.float32)
    options = dict(activation=activation, act_params=act_params, normalization=normalization, softmax_scale=0.6)
    pooled, attn = functional.score_candidates(history, candidates, weights, biases, backend="triton", **options)
    ref_options = dict(options, act_params=[tuple(p.double() for p in layer) for layer in act_params])
    ref_pooled, ref_attn = reference.score_candidates(history.double(), candidates.double(),
                                                      [w.double() for w in weights], [b.double() for b in biases],
                                                      **ref_options)
    assert pooled.shape == (num_candidates, dim) and attn.shape == (num_candidates, seq_len)
    assert_close(pooled, ref_pooled, torch.float32, "pooled")
    assert_close(attn, ref_attn, torch.float32, "weights")


def test_dice_training_is_refused_not_approximated():
    query, keys = torch.randn(2, 18, device=DEVICE), torch.randn(2, 3, 18, device=DEVICE)
    weights, biases, act_params = make_mlp(18, (12,), "dice", torch.float32)
    with pytest.raises(NotImplementedError, match="attention_pooling_dice_training"):
        functional.attention_pooling(query, keys, weights, biases, activation="dice", act_params=act_params,
                                     training=True, backend="triton")


def test_float64_is_refused():
    query, keys = torch.randn(2, 18, device=DEVICE).double(), torch.randn(2, 3, 18, device=DEVICE).double()
    weights, biases, _ = make_mlp(18, (12,), "sigmoid", torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        functional.attention_pooling(query, keys, weights, biases, backend="triton")


def test_torch_compile_traces_without_graph_breaks():
    query = torch.randn(2, 18, device=DEVICE, requires_grad=True)
    keys = torch.randn(2, 5, 18, device=DEVICE)
    weights, biases, _ = make_mlp(18, (12, 8), "sigmoid", torch.float32)
    lengths = torch.tensor([5, 2], device=DEVICE)

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


def test_custom_ops_pass_opcheck():
    query = torch.randn(2, 18, device=DEVICE)
    keys = torch.randn(2, 4, 18, device=DEVICE)
    weights, biases, _ = make_mlp(18, (12,), "sigmoid", torch.float32)
    args = (query, keys, weights, biases, torch.tensor([4, 1], device=DEVICE), None, [], "sigmoid", "softmax",
            1.0, 1e-8)
    torch.library.opcheck(torch.ops.din_fast.attention_pooling_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    pooled, attn, row_max, row_sum = torch.ops.din_fast.attention_pooling_fwd(*args)
    backward_args = args[:7] + (pooled, attn, row_max, row_sum, torch.randn_like(pooled), torch.randn_like(attn)) \
        + args[7:]
    torch.library.opcheck(torch.ops.din_fast.attention_pooling_bwd.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_aot_specs_cover_every_option():
    names = {spec["name"] for spec in kernels.AOT_SPECS}
    for dtype in ("float32", "bfloat16", "float16"):
        for activation in kernels.ACTIVATION_CODES:
            for normalization in kernels.NORMALIZATION_CODES:
                tag = f"{dtype}_d36_h80x40_{activation}_{normalization}"
                assert any(n.startswith(f"din_attention_bwd_{tag}_p") for n in names)
                assert any(n.startswith(f"din_attention_bwd_{tag}_mask_p") for n in names)
                assert any(n.startswith(f"din_attention_fwd_{tag}_t") for n in names)
    for spec in kernels.AOT_SPECS:
        assert set(spec["signature"]) == set(spec["fn"].arg_names)
        assert all(spec["signature"][name] == "constexpr" for name in spec["constexprs"])
