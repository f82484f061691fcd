"""The chunked full-softmax CE equals F.cross_entropy in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from cammsr.model.chunked_ce import chunked_softmax_ce


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_value_and_gradients_match_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, requires_grad=True)
    table = torch.randn(11, 5, generator=g, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7, 1, 10])
    ref_h, ref_t = h.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_t.T, targets, reduction="sum")
    (2.5 * ref).backward()
    got = chunked_softmax_ce(h, table, targets, chunk=chunk)
    (2.5 * got).backward()  # the upstream gradient scales both
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(h.grad, ref_h.grad, atol=1e-5)
    assert torch.allclose(table.grad, ref_t.grad, atol=1e-5)


def test_hand_computed_value_and_frozen_table():
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # scores [0, 1]; target 1: CE = log(1 + e) - 1
    loss = chunked_softmax_ce(h, table, torch.tensor([1]))
    assert loss.item() == pytest.approx(torch.log1p(torch.tensor(1.0).exp()).item() - 1.0, abs=1e-6)
    loss.backward()
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.allclose(h.grad, (p - torch.tensor([0.0, 1.0])) @ table)  # grad_h = (softmax - onehot) @ table
