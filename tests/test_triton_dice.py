"""Dice's Triton kernels (run in Triton's interpreter without a GPU) against the float64 reference:
output, dx, dalpha (and dweight, dbias of the affine gate) and the running statistics, on both the
one-launch and the multi-pass paths. Every buffer the op allocates uninitialized (outputs,
statistics, counts, chunk partials) starts as NaN (signed integers as -1): an element a kernel
forgets to write reaches a compared result."""

import pytest
import torch

import din_fast
from din_fast import reference
from din_fast.testing import assert_close, nan_filled, nan_filled_allocations

triton = pytest.importorskip("triton")
from din_fast.kernels import dice as _k  # noqa: E402
from din_fast.triton_ops import dice as _ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("on_kernel_device")

MOMENTUM = 0.1
EPS = 1e-8


def _inputs(shape, dtype, masked, valid_fraction=0.6):
    channels = shape[-1]
    x = torch.randn(shape, dtype=torch.float32).mul_(1.7).add_(0.3).to(dtype)
    alpha = torch.rand(channels) * 1.5 - 0.25
    running_mean = torch.randn(channels)
    running_var = torch.rand(channels) + 0.5
    mask = (torch.rand(shape[:-1]) < valid_fraction) if masked else None
    grad = torch.randn(shape, dtype=torch.float32).to(dtype)
    return x, alpha, running_mean, running_var, mask, grad


def _affine(channels):
    """The affine gate's ``(weight, bias)`` [C]: random, with a zero weight (channel 0: a gate that
    ignores x, whose xhat gradient vanishes) and negative weights (channels 1, 4, ...: a reversed
    gate)."""
    weight = torch.rand(channels) * 1.5 + 0.25
    weight[1::3] *= -1.0
    weight[0] = 0.0
    bias = torch.randn(channels) * 0.5
    return weight, bias


def _reference(x, alpha, running_mean, running_var, mask, grad, training, weight=None, bias=None):
    """float64 ``(y, dx, dalpha, running_mean, running_var, dweight, dbias)`` of the reference on
    copies; dweight and dbias are None without the affine gate."""
    x64 = x.detach().double().requires_grad_()
    alpha64 = alpha.detach().double().requires_grad_()
    leaves = [x64, alpha64]
    affine = {}
    if weight is not None:
        affine = dict(weight=weight.detach().double().requires_grad_(), bias=bias.detach().double().requires_grad_())
        leaves += [affine["weight"], affine["bias"]]
    rm = None if running_mean is None else running_mean.double().clone()
    rv = None if running_var is None else running_var.double().clone()
    y = reference.dice(x64, alpha64, rm, rv, mask, training=training, momentum=MOMENTUM, eps=EPS, **affine)
    dx, dalpha, *daffine = torch.autograd.grad(y, leaves, grad.double())
    dweight, dbias = daffine or (None, None)
    return y, dx, dalpha, rm, rv, dweight, dbias


def _check_public(x, alpha, running_mean, running_var, mask, grad, training, dtype, dalpha_scale=1.0):
    """Runs ``din_fast.dice(backend="triton")``, its allocations NaN-filled, and compares
    everything with the reference."""
    expected = _reference(x, alpha, running_mean, running_var, mask, grad, training)
    xt = x.clone().requires_grad_()
    alphat = alpha.clone().requires_grad_()
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    with nan_filled_allocations():
        y = din_fast.dice(xt, alphat, rm, rv, mask, training=training, momentum=MOMENTUM, eps=EPS,
                          backend="triton")
        y.backward(grad)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert xt.grad.dtype == x.dtype and alphat.grad.dtype == alpha.dtype
    assert_close(y, expected[0], dtype, "y")
    assert_close(xt.grad, expected[1], dtype, "dx")
    # dalpha sums M rounded terms.
    assert_close(alphat.grad, expected[2], dtype, "dalpha", scale=dalpha_scale)
    if rm is not None:
        # The statistics are fp32 whatever the input dtype; only the input rounding differs.
        assert_close(rm, expected[3], torch.float32, "running_mean")
        assert_close(rv, expected[4], torch.float32, "running_var")
    return y, xt.grad, alphat.grad, rm, rv


def _check_affine(x, alpha, running_mean, running_var, mask, grad, training, dtype):
    """Runs ``din_fast.dice(backend="triton")`` with the affine gate, its allocations NaN-filled,
    and compares the output, the running statistics and every gradient (x, alpha, weight, bias)
    with the reference."""
    weight, bias = _affine(x.shape[-1])
    expected = _reference(x, alpha, running_mean, running_var, mask, grad, training, weight, bias)
    leaves = [t.clone().requires_grad_() for t in (x, alpha, weight, bias)]
    rm, rv = running_mean.clone(), running_var.clone()
    with nan_filled_allocations():
        y = din_fast.dice(leaves[0], leaves[1], rm, rv, mask, training=training, momentum=MOMENTUM, eps=EPS,
                          weight=leaves[2], bias=leaves[3], backend="triton")
        y.backward(grad)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert [leaf.grad.dtype for leaf in leaves] == [x.dtype] + [torch.float32] * 3
    assert_close(y, expected[0], dtype, "y")
    for leaf, want, name in zip(leaves, (expected[1], expected[2], expected[5], expected[6]),
                                ("dx", "dalpha", "dweight", "dbias")):
        assert_close(leaf.grad, want, dtype, name)
    assert_close(rm, expected[3], torch.float32, "running_mean")
    assert_close(rv, expected[4], torch.float32, "running_var")
    if not training:
        assert torch.equal(rm, running_mean) and torch.equal(rv, running_var)


@pytest.fixture(params=["one_pass", "multi_pass", "multi_pass_merged_tiles"])
def path(request, monkeypatch):
    """The launchers' path: one launch, or the multi-pass grid with one tile per chunk, or with
    several tiles merged inside each program."""
    if request.param != "one_pass":
        monkeypatch.setattr(_k, "ONE_PASS_MAX_ROWS", 0)
    if request.param == "multi_pass":
        monkeypatch.setattr(_k, "MAX_CHUNKS", 10**9)
    if request.param == "multi_pass_merged_tiles":
        monkeypatch.setattr(_k, "MAX_CHUNKS", 2)
    return request.param


# [N, C] and [N, T, C]; M = 150 rows spans three 64-row tiles of the multi-pass path and the
# larger one-launch config; C = 80 spans three channel blocks, C = 13 and 3 a partial one.
SHAPES = [(150, 80), (5, 30, 13), (3, 7, 3), (1, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_training_matches_reference(shape, masked, path):
    x, alpha, rm, rv, mask, grad = _inputs(shape, torch.float32, masked)
    _check_public(x, alpha, rm, rv, mask, grad, True, torch.float32)


@pytest.mark.parametrize("shape", [(150, 80), (5, 30, 13), (1, 1, 3)], ids=lambda s: "x".join(map(str, s)))
def test_inference_matches_reference(shape, path):
    x, alpha, rm, rv, mask, grad = _inputs(shape, torch.float32, True)
    _, _, _, rm_after, rv_after = _check_public(x, alpha, rm, rv, mask, grad, False, torch.float32)
    assert torch.equal(rm_after, rm) and torch.equal(rv_after, rv)


@pytest.mark.parametrize("channels", [13, 12], ids=["C13", "C12"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_half_precision_inputs(dtype, training, channels, path):
    # The interpreter upcasts after load like the kernels do, so this checks the fp32 statistics
    # and the stores in the input dtype; the reference sees the same rounded inputs. C = 12 takes
    # the kernels' vector width (VEC = 4), C = 13 none.
    x, alpha, rm, rv, mask, grad = _inputs((6, 25, channels), dtype, True)
    _check_public(x, alpha, rm, rv, mask, grad, training, dtype)


def test_single_row():
    # N = 1: every channel has variance 0, and the unbiased running variance stays 0.
    x, alpha, rm, rv, _, grad = _inputs((1, 7), torch.float32, False)
    _, dx, _, _, rv_after = _check_public(x, alpha, rm, rv, None, grad, True, torch.float32)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(rv_after, (1 - MOMENTUM) * rv)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_constant_channel(masked, path):
    x, alpha, rm, rv, mask, grad = _inputs((5, 30, 6), torch.float32, masked)
    x[..., 2] = 0.7
    y, dx, dalpha, _, rv_after = _check_public(x, alpha, rm, rv, mask, grad, True, torch.float32)
    for value in (y, dx, dalpha):
        assert torch.isfinite(value).all()
    assert rv_after[2] == pytest.approx((1 - MOMENTUM) * rv[2].item(), rel=1e-6)


def test_all_false_mask_leaves_running_stats(path):
    x, alpha, rm, rv, _, grad = _inputs((5, 30, 13), torch.float32, False)
    mask = torch.zeros(5, 30, dtype=torch.bool)
    y, dx, dalpha, rm_after, rv_after = _check_public(x, alpha, rm, rv, mask, grad, True, torch.float32)
    assert torch.equal(rm_after, rm) and torch.equal(rv_after, rv)
    for value in (y, dx, dalpha):
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_empty_batch(training, path):
    x, alpha, rm, rv, mask, grad = _inputs((0, 5), torch.float32, True)
    _, _, dalpha, rm_after, rv_after = _check_public(x, alpha, rm, rv, mask, grad, training, torch.float32)
    assert torch.equal(rm_after, rm) and torch.equal(rv_after, rv)
    assert torch.equal(dalpha, torch.zeros_like(alpha))


def test_untracked_running_stats(path):
    x, alpha, _, _, mask, grad = _inputs((4, 9, 5), torch.float32, True)
    _check_public(x, alpha, None, None, mask, grad, True, torch.float32)


def test_many_chunks(monkeypatch):
    # 38 chunks of one 64-row tile: the combine kernels take two 32-chunk steps.
    monkeypatch.setattr(_k, "ONE_PASS_MAX_ROWS", 0)
    monkeypatch.setattr(_k, "MAX_CHUNKS", 10**9)
    x, alpha, rm, rv, mask, grad = _inputs((2400, 3), torch.float32, True)
    _check_public(x, alpha, rm, rv, mask, grad, True, torch.float32)


@pytest.mark.parametrize("one_pass_max_rows, tiles_per_chunk", [(None, None), (0, 1), (0, 2)],
                         ids=["one_pass", "multi_pass", "multi_pass_merged_tiles"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_launchers_write_every_output(one_pass_max_rows, tiles_per_chunk, masked):
    """The launchers on each path, y and dx in NaN-filled ``out`` buffers and every buffer they
    allocate themselves (mean, var, count, dalpha, the chunk partials) NaN-filled (count -1):
    every output, statistic and gradient against the reference."""
    rows, channels = 150, 13
    x, alpha, rm, rv, mask, grad = _inputs((rows, channels), torch.float32, masked)
    y_ref, dx_ref, dalpha_ref, rm_ref, rv_ref, _, _ = _reference(x, alpha, rm, rv, mask, grad, True)
    mask8 = None if mask is None else mask.view(torch.uint8)
    options = dict(one_pass_max_rows=one_pass_max_rows, tiles_per_chunk=tiles_per_chunk)
    y_out = nan_filled((rows, channels), torch.float32, x.device)
    with nan_filled_allocations():
        y, mean, var, count = _k.dice_forward_training(x, alpha, mask8, rm, rv, MOMENTUM, EPS, out=y_out,
                                                       **options)
    assert y is y_out
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(rm, rm_ref, torch.float32, "running_mean")
    assert_close(rv, rv_ref, torch.float32, "running_var")
    keep = torch.ones(rows, dtype=torch.bool) if mask is None else mask
    assert int(count.item()) == int(keep.sum())
    assert_close(mean, x.double()[keep].mean(0), torch.float32, "mean")
    assert_close(var, x.double()[keep].var(0, unbiased=False), torch.float32, "var")
    dx_out = nan_filled((rows, channels), torch.float32, x.device)
    with nan_filled_allocations():
        dx, dalpha, dweight, dbias = _k.dice_backward(x, grad, alpha, mask8, mean, var, count, True, EPS,
                                                      out=dx_out, **options)
    assert dx is dx_out and dweight is None and dbias is None
    assert_close(dx, dx_ref, torch.float32, "dx")
    assert_close(dalpha, dalpha_ref, torch.float32, "dalpha")
    # Inference launchers, on the running statistics just produced.
    y_ref, dx_ref, dalpha_ref, *_ = _reference(x, alpha, rm, rv, None, grad, False)
    with nan_filled_allocations():
        y = _k.dice_forward_inference(x, alpha, rm, rv, EPS, out=nan_filled((rows, channels), torch.float32,
                                                                            x.device),
                                      tiles_per_chunk=tiles_per_chunk)
    assert_close(y, y_ref, torch.float32, "y (inference)")
    with nan_filled_allocations():
        dx, dalpha, dweight, dbias = _k.dice_backward(x, grad, alpha, None, rm, rv, None, False, EPS,
                                                      out=nan_filled((rows, channels), torch.float32, x.device),
                                                      **options)
    assert dweight is None and dbias is None
    assert_close(dx, dx_ref, torch.float32, "dx (inference)")
    assert_close(dalpha, dalpha_ref, torch.float32, "dalpha (inference)")


# ----------------------------------------------------------------------------------------------
# The affine gate: p = sigmoid(weight * xhat + bias)
# ----------------------------------------------------------------------------------------------

# [N, C] over three 64-row tiles (the larger one-launch config), and [N, T, C] with a partial
# channel block.
AFFINE_SHAPES = [(150, 13), (4, 9, 5), (150, 12)]


@pytest.mark.parametrize("shape", AFFINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_affine_training_matches_reference(shape, masked, path):
    x, alpha, rm, rv, mask, grad = _inputs(shape, torch.float32, masked)
    _check_affine(x, alpha, rm, rv, mask, grad, True, torch.float32)


@pytest.mark.parametrize("shape", AFFINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_affine_inference_matches_reference(shape, path):
    x, alpha, rm, rv, mask, grad = _inputs(shape, torch.float32, True)
    _check_affine(x, alpha, rm, rv, mask, grad, False, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_affine_half_precision_inputs(dtype, training, path):
    x, alpha, rm, rv, mask, grad = _inputs((6, 25, 13), dtype, True)
    _check_affine(x, alpha, rm, rv, mask, grad, training, dtype)


@pytest.mark.parametrize("one_pass_max_rows, tiles_per_chunk", [(None, None), (0, 1), (0, 2)],
                         ids=["one_pass", "multi_pass", "multi_pass_merged_tiles"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_affine_launchers_write_every_output(one_pass_max_rows, tiles_per_chunk, masked):
    """As ``test_launchers_write_every_output`` with the affine gate, in training and inference:
    dweight and dbias, and the partials behind them, allocated NaN-filled too."""
    rows, channels = 150, 13
    x, alpha, rm, rv, mask, grad = _inputs((rows, channels), torch.float32, masked)
    weight, bias = _affine(channels)
    affine = dict(weight=weight, bias=bias)
    mask8 = None if mask is None else mask.view(torch.uint8)
    options = dict(one_pass_max_rows=one_pass_max_rows, tiles_per_chunk=tiles_per_chunk)
    for training in (True, False):
        mode = "training" if training else "inference"
        y_ref, dx_ref, dalpha_ref, rm_ref, rv_ref, dweight_ref, dbias_ref = _reference(
            x, alpha, rm, rv, mask, grad, training, weight, bias)
        y_out = nan_filled((rows, channels), torch.float32, x.device)
        if training:
            with nan_filled_allocations():
                y, mean, var, count = _k.dice_forward_training(x, alpha, mask8, rm, rv, MOMENTUM, EPS, out=y_out,
                                                               **affine, **options)
            assert_close(rm, rm_ref, torch.float32, "running_mean")
            assert_close(rv, rv_ref, torch.float32, "running_var")
        else:
            mean, var, count = rm, rv, None
            with nan_filled_allocations():
                y = _k.dice_forward_inference(x, alpha, rm, rv, EPS, out=y_out, tiles_per_chunk=tiles_per_chunk,
                                              **affine)
        assert y is y_out
        assert_close(y, y_ref, torch.float32, f"y ({mode})")
        dx_out = nan_filled((rows, channels), torch.float32, x.device)
        with nan_filled_allocations():
            dx, dalpha, dweight, dbias = _k.dice_backward(x, grad, alpha, mask8, mean, var, count, training, EPS,
                                                          out=dx_out, **affine, **options)
        assert dx is dx_out
        assert_close(dx, dx_ref, torch.float32, f"dx ({mode})")
        assert_close(dalpha, dalpha_ref, torch.float32, f"dalpha ({mode})")
        assert_close(dweight, dweight_ref, torch.float32, f"dweight ({mode})")
        assert_close(dbias, dbias_ref, torch.float32, f"dbias ({mode})")


def test_affine_identity_matches_plain_gate(path):
    """weight 1, bias 0 is the plain gate. The float64 reference gives the same output, dx and
    dalpha with and without the identity parameters; the kernels' affine run (its allocations
    NaN-filled) gives those of the plain gate, against the reference and against the kernels'
    plain run, with dweight and dbias against the reference's, and both runs update the running
    statistics alike."""
    x, alpha, rm, rv, mask, grad = _inputs((5, 30, 13), torch.float32, True)
    identity = dict(weight=torch.ones(13), bias=torch.zeros(13))
    plain_ref = _reference(x, alpha, rm, rv, mask, grad, True)
    identity_ref = _reference(x, alpha, rm, rv, mask, grad, True, **identity)
    names = ("y", "dx", "dalpha", "running_mean", "running_var")
    for name, want, got in zip(names, plain_ref, identity_ref):
        assert_close(got, want, torch.float64, f"reference {name}")
    results = []
    for affine in ({}, identity):
        leaves = [t.clone().requires_grad_() for t in (x, alpha, *affine.values())]
        running = (rm.clone(), rv.clone())
        with nan_filled_allocations():
            y = _ops.dice(leaves[0], leaves[1], *running, mask, training=True, momentum=MOMENTUM, eps=EPS,
                          **dict(zip(affine, leaves[2:])))
            y.backward(grad)
        results.append((y, leaves[0].grad, leaves[1].grad, *running))
        for name, got, want in zip(names, results[-1], plain_ref):
            assert_close(got, want, torch.float32, f"{name} ({'affine' if affine else 'plain'})")
        if affine:
            assert_close(leaves[2].grad, identity_ref[5], torch.float32, "dweight")
            assert_close(leaves[3].grad, identity_ref[6], torch.float32, "dbias")
    for name, plain, affine in zip(names, *results):
        assert_close(affine, plain.double(), torch.float32, f"{name}: affine against plain")


def _at_offset(t):
    """The values of ``t`` in a contiguous view 1 element past an aligned start, and its base."""
    base = torch.cat([t.new_zeros(1), t.reshape(-1)])
    return base, base[1:].view(t.shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_views_off_a_16_byte_boundary(training, path):
    """x, alpha, the mask, the running statistics and the gradient as views whose data start 4
    (1 for the mask) bytes past an aligned address: the op copies what the kernels read, which
    take only 16-byte-aligned pointers, and the running statistics are still updated in place.
    C = 12 takes the vector width."""
    x, alpha, rm, rv, mask, grad = _inputs((150, 12), torch.float32, True)
    expected = _reference(x, alpha, rm, rv, mask, grad, training)
    x_base, _ = _at_offset(x)
    alpha_base, _ = _at_offset(alpha)
    x_base.requires_grad_()
    alpha_base.requires_grad_()
    x_view, alpha_view = x_base[1:].view(x.shape), alpha_base[1:]
    views = [_at_offset(t)[1] for t in (rm, rv, mask, grad)]
    assert all(t.data_ptr() % 16 != 0 for t in [x_view, alpha_view, *views])
    rm_view, rv_view, mask_view, grad_view = views
    y = din_fast.dice(x_view, alpha_view, rm_view, rv_view, mask_view, training=training, momentum=MOMENTUM,
                      eps=EPS, backend="triton")
    y.backward(grad_view)
    assert_close(y, expected[0], torch.float32, "y")
    assert_close(x_base.grad[1:].view(x.shape), expected[1], torch.float32, "dx")
    assert_close(alpha_base.grad[1:], expected[2], torch.float32, "dalpha")
    assert_close(rm_view, expected[3], torch.float32, "running_mean")
    assert_close(rv_view, expected[4], torch.float32, "running_var")
    with pytest.raises(AssertionError, match="16-byte-aligned"):
        _k.dice_forward_inference(x_view.detach(), alpha, rm, rv, EPS)


def test_rejects_float64():
    x, alpha, rm, rv, _, _ = _inputs((4, 3), torch.float64, False)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        din_fast.dice(x, alpha, rm, rv, training=True, backend="triton")


def test_refuses_more_positions_than_the_kernels_index():
    # Meta tensors: only the shape matters; "auto" would take the torch backend.
    x = torch.empty(2**15, 2**15, 1, device="meta")
    with pytest.raises(NotImplementedError, match=r"Dice of 1073741824 or more positions"):
        din_fast.dice(x, torch.zeros(1, device="meta"), None, None, training=True, backend="triton")


def test_custom_op_registrations():
    x, alpha, rm, rv, mask, _ = _inputs((6, 3), torch.float32, True)
    weight, bias = _affine(3)
    x, alpha, weight, bias = (t.requires_grad_() for t in (x, alpha, weight, bias))
    samples = [
        (x, alpha, rm, rv, mask, True, MOMENTUM, EPS, None, None),
        (x, alpha, None, None, None, True, MOMENTUM, EPS, None, None),
        (x, alpha, rm, rv, None, False, MOMENTUM, EPS, None, None),
        (x, alpha, rm, rv, mask, True, MOMENTUM, EPS, weight, bias),
        (x, alpha, None, None, None, True, MOMENTUM, EPS, weight, bias),
        (x, alpha, rm, rv, None, False, MOMENTUM, EPS, weight, bias),
    ]
    # A transposed x: the real ops return contiguous tensors, and the fake ones must say so.
    x_t = x.detach().t().contiguous().t().requires_grad_()
    samples += [(x_t, alpha, rm, rv, mask, True, MOMENTUM, EPS, weight, bias),
                (x_t, alpha, rm, rv, None, False, MOMENTUM, EPS, None, None)]
    for args in samples:
        torch.library.opcheck(_ops._dice_forward, args)
    for training in (True, False):
        with torch.no_grad():
            _, mean, var, count, _, _ = _ops._dice_forward(x_t, alpha, rm, rv, mask, training, MOMENTUM, EPS,
                                                           weight, bias)
        torch.library.opcheck(_ops._dice_backward, (torch.randn(6, 3).t().contiguous().t(), x_t.detach(),
                                                    alpha.detach(), mask, mean, var, count, training, EPS,
                                                    weight.detach(), bias.detach()))


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_torch_compile_traces_without_graph_breaks(affine):
    x, alpha, rm, rv, mask, grad = _inputs((3, 5, 7), torch.float32, True)
    weight, bias = _affine(7)

    def step(x, alpha, running_mean, running_var, mask, weight, bias):
        return _ops.dice(x, alpha, running_mean, running_var, mask, training=True, weight=weight, bias=bias) * 2.0

    def inputs():
        leaves = [t.clone().requires_grad_() for t in (x, alpha, weight, bias)]
        if not affine:
            leaves[2:] = [None, None]
        return leaves

    explanation = torch._dynamo.explain(step)(*inputs()[:2], rm.clone(), rv.clone(), mask, *inputs()[2:])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        xt, alphat, weightt, biast = inputs()
        running = (rm.clone(), rv.clone())
        y = fn(xt, alphat, *running, mask, weightt, biast)
        y.backward(grad)
        grads = (weightt.grad, biast.grad) if affine else ()
        results.append((y, xt.grad, alphat.grad) + grads + running)
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    assert not torch.equal(results[1][-2], rm)
