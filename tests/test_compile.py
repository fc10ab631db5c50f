"""torch.compile traces din_fast's modules and the DIN model without graph breaks, with the same
outputs and gradients as eager execution."""

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


@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_attention_pooling_compiles_without_graph_breaks(activation, normalization):
    pool = din_fast.AttentionPooling(8, (6, 4), activation=activation, normalization=normalization, backend="torch")
    query, keys, lengths = torch.randn(3, 8), torch.randn(3, 5, 8), torch.tensor([5, 0, 2])
    explanation = torch._dynamo.explain(pool)(query, keys, lengths)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True)
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
