"""cammsr/model/dropout.py: the fast masks keep the rate and the scale, follow the seed, and attention's
spelled-out dropout path is SDPA's math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cammsr.model import dropout as dropout_module
from cammsr.model.dropout import Dropout, attention, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, p, training=True)
    kept = y != 0
    # binomial: std of the kept share is sqrt(p (1-p) / n) <= 5e-4; 5 sigma
    assert abs(kept.float().mean().item() - (1 - p)) < 2.5e-3
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # inverted scaling
    assert abs(y.mean().item() - 1.0) < 2.5e-3 / (1 - p)  # expectation kept


def test_masks_are_independent_and_not_a_fixed_pattern():
    torch.manual_seed(0)
    a, b = keep_mask(torch.ones(200_000), 0.5) > 0, keep_mask(torch.ones(200_000), 0.5) > 0
    assert abs((a & b).float().mean().item() - 0.25) < 5e-3  # two draws agree as independent coins do
    assert abs((a[1:] & a[:-1]).float().mean().item() - 0.25) < 5e-3  # neighbours too


def test_every_lane_of_a_random_word_keeps_the_rate():
    torch.manual_seed(0)
    kept = (keep_mask(torch.ones(400_000), 0.3) > 0).view(-1, 4).float().mean(0)  # [4]: one per 15-bit lane
    assert torch.allclose(kept, torch.full((4,), 0.7), atol=5e-3)  # std 1.4e-3 per lane


@pytest.mark.parametrize("shape", [(3,), (5, 7), (2, 3, 5)])
def test_masks_of_sizes_not_a_multiple_of_four(shape):
    m = keep_mask(torch.ones(shape), 0.5)
    assert m.shape == shape and set(m.unique().tolist()) <= {0.0, 2.0}


def test_the_seed_fixes_the_mask_and_eval_is_identity():
    x = torch.randn(64, 33)
    torch.manual_seed(7)
    first = dropout(x, 0.3, training=True)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.3, training=True), first)
    assert not torch.equal(dropout(x, 0.3, training=True), first)  # the generator moved on
    layer = Dropout(0.3).eval()
    assert layer(x) is x and dropout(x, 0.0, training=True) is x


def test_slow_path_is_torch_dropout():
    x = torch.randn(1000)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.4, True)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.4, fast=False).train()(x), expected)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_math_matches_sdpa(masked, monkeypatch):
    """With every mask entry kept, the spelled-out path (taken when fast dropout drops) is SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g) for _ in range(3))
    mask = None
    if masked:  # one query per sequence at `last`, as scoring asks for
        last = torch.tensor([5, 2, 0])
        q = q[torch.arange(3), :, last][:, :, None]  # [3, 2, 1, 4]
        mask = (torch.arange(6)[None, :] <= last[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    monkeypatch.setattr(dropout_module, "keep_mask", lambda x, p: torch.ones_like(x))
    got = attention(q, k, v, mask, 0.5, training=True, fast=True)
    assert torch.allclose(got, expected, atol=1e-6)



@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_attention_without_dropout_matches_sdpa_in_value_and_gradient(masked, training):
    """Not dropping (eval, or p = 0) on a CPU, the spelled-out path gives SDPA's output and gradients."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 2, 7, 8, generator=g) for _ in range(3))
    mask = None
    if masked:
        last = torch.tensor([6, 3, 0, 1])
        q = q[torch.arange(4), :, last][:, :, None]  # [4, 2, 1, 8]
        mask = (torch.arange(7)[None, :] <= last[:, None])[:, None, None, :]
    grad = torch.randn(q.shape, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = attention(*leaves, mask, 0.0 if training else 0.5, training=training)
    got.backward(grad)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*ref, attn_mask=mask, is_causal=mask is None)
    expected.backward(grad)
    assert torch.allclose(got, expected, atol=1e-6)
    for a, b in zip(leaves, ref, strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)

def test_attention_dropout_drops_weights_at_the_rate():
    torch.manual_seed(0)
    q = k = torch.zeros(1, 1, 400, 8)
    v = torch.ones(1, 1, 400, 8)
    # uniform causal attention over i+1 keys; dropped weights are zeroed, kept ones scaled by 2
    out = attention(q, k, v, None, 0.5, training=True, fast=True)[0, 0, :, 0]  # [400]
    assert abs(out[200:].mean().item() - 1.0) < 0.02  # expectation kept
    assert out[200:].std().item() > 0.05  # and it is random
