"""torch.compile traces din_fast's modules and the DIN model without graph breaks, with the same
outputs and gradients as eager execution."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo

import din_fast
from din_fast.data import make_batch, make_synthetic
from din_fast.models import DIN
from din_fast.testing import assert_close


def _gradients(module, loss):
    return torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad])


@pytest.mark.parametrize("activation,normalization,dynamic", [
    ("sigmoid", "none", False), ("sigmoid", "softmax", False), ("prelu", "none", False), ("prelu", "softmax", False),
    ("dice", "none", False), ("dice", "softmax", False),
    # Dynamic shapes trace the argument checks on a symbolic softmax_scale and Dice widths.
    ("dice", "softmax", True),
])
def test_attention_pooling_compiles_without_graph_breaks(activation, normalization, dynamic):
    pool = din_fast.AttentionPooling(8, (6, 4), activation=activation, normalization=normalization,
                                     softmax_scale=0.5, backend="torch")
    query, keys, lengths = torch.randn(3, 8), torch.randn(3, 5, 8), torch.tensor([5, 0, 2])
    explanation = torch._dynamo.explain(pool)(query, keys, lengths)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    pool.eval()  # Dice's running statistics stay fixed, so both runs see the same module.
    out = compiled(query, keys, lengths)
    expected = pool(query, keys, lengths)
    assert_close(out, expected, torch.float32, "pooled")
    for got, want in zip(_gradients(pool, out.sum()), _gradients(pool, expected.sum())):
        assert_close(got, want, torch.float32, "gradient")


@pytest.mark.parametrize("mlp_activation", ["prelu", "dice"])
def test_din_model_compiles_without_graph_breaks(mlp_activation):
    torch._dynamo.reset()
    data = make_synthetic(num_users=200, num_items=100, num_categories=10, seed=0)
    model = DIN(data.vocabulary, mlp_activation=mlp_activation, backend="torch").eval()
    batch = make_batch(data, data.train, np.arange(32), 20)
    explanation = torch._dynamo.explain(model)(batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    logits, expected = compiled(batch), model(batch)
    assert_close(logits, expected, torch.float32, "logits")
    for got, want in zip(_gradients(model, logits.sum()), _gradients(model, expected.sum())):
        assert_close(got, want, torch.float32, "gradient")


@pytest.mark.parametrize("op", ["attention_pooling", "dice", "mba_penalty"])
def test_first_triton_call_compiles_in_a_fresh_process(op):
    # Nothing imported the triton backend's modules before the traced call: Dynamo cannot trace
    # their import, so the backend takes it out of the graph.
    pytest.importorskip("triton")
    calls = {
        "attention_pooling": "F.attention_pooling(torch.randn(2, 8), torch.randn(2, 3, 8), [torch.randn(6, 32), "
                             "torch.randn(1, 6)], [torch.randn(6), torch.randn(1)], backend='triton')[0]",
        "dice": "F.dice(torch.randn(5, 4), torch.rand(4), None, None, training=True, backend='triton')",
        "mba_penalty": "F.mba_penalty(torch.randn(6, 3), torch.tensor([1, 4]), torch.ones(6), 0.5, backend='triton')",
    }
    script = ("import sys, torch\n"
              "from din_fast import functional as F\n"
              "assert not any(name.startswith('din_fast.triton_ops.') for name in sys.modules)\n"
              f"out = torch.compile(lambda: {calls[op]}.sum(), backend='aot_eager', fullgraph=True)()\n"
              "assert torch.isfinite(out)\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
