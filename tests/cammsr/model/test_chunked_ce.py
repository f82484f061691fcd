"""The chunked full-softmax CE equals F.cross_entropy in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from cammsr.model.chunked_ce import _grad_runs, block_workspace, chunked_softmax_ce, release_workspace


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


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_padding_row_equals_the_sliced_table(compute_dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 8, generator=g) * 0.5
    table = torch.randn(12, 8, generator=g) * 0.5  # row 0: padding, with a large score it must not get
    table[0] = 3.0
    targets = torch.randint(1, 12, (40,), generator=g)
    ref_h, ref_t = h.clone().requires_grad_(), table[1:].clone().requires_grad_()
    ref = chunked_softmax_ce(ref_h, ref_t, targets - 1, chunk=16, compute_dtype=compute_dtype)
    ref.backward()
    got_h, got_t = h.clone().requires_grad_(), table.clone().requires_grad_()
    got = chunked_softmax_ce(got_h, got_t, targets, chunk=16, compute_dtype=compute_dtype, padding_row=True)
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(got_h.grad, ref_h.grad, atol=1e-5)
    assert torch.equal(got_t.grad[0], torch.zeros(8))  # never scored: no gradient
    assert torch.allclose(got_t.grad[1:], ref_t.grad, atol=1e-5)



def _blocks_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(70, 12, generator=g) * 0.5
    blocks = [torch.randn(15, w, generator=g) * 0.5 for w in (4, 5, 3)]
    return h, blocks, torch.randint(1, 15, (70,), generator=g)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("learned", [(True, False, False), (False, True, True), (True, False, True), (False,) * 3])
def test_table_in_blocks_equals_the_whole_table(compute_dtype, learned):
    """Column blocks side by side give the whole table's loss and gradients; a block that needs no gradient
    gets none."""
    h, blocks, targets = _blocks_case(2)
    ref_h, ref_t = h.clone().requires_grad_(), torch.cat(blocks, 1).requires_grad_()
    ref = chunked_softmax_ce(ref_h, ref_t, targets, chunk=32, compute_dtype=compute_dtype, padding_row=True)
    (1.5 * ref).backward()
    got_h = h.clone().requires_grad_()
    parts = [b.clone().requires_grad_(need) for b, need in zip(blocks, learned, strict=True)]
    got = chunked_softmax_ce(got_h, parts, targets, chunk=32, compute_dtype=compute_dtype, padding_row=True)
    (1.5 * got).backward()
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(got_h.grad, ref_h.grad, atol=1e-5)
    start = 0
    for part, need in zip(parts, learned, strict=True):
        w = part.shape[1]
        if need:
            assert torch.allclose(part.grad, ref_t.grad[:, start : start + w], atol=1e-5)
        else:
            assert part.grad is None
        start += w


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[3, 7, 12], [], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
def test_fixed_block_learned_at_a_few_rows_gets_the_same_gradients(compute_dtype, rows):
    """A block fixed but at some rows (a learned vector there, as CAMMSR's missing vectors): with those rows as
    ``grad_rows``, the vector's gradient and every other gradient equal those of the whole-table CE."""
    h, blocks, targets = _blocks_case(3)
    absent = torch.zeros(15, dtype=torch.bool)
    absent[rows] = True

    def run(grad_rows):
        hh = h.clone().requires_grad_()
        id_block = blocks[0].clone().requires_grad_()
        missing = torch.full((5,), 0.3).requires_grad_()
        content = torch.where(absent[:, None], missing, blocks[1])  # [15, 5] fixed but at `rows`
        loss = chunked_softmax_ce(hh, [id_block, content, blocks[2]], targets, chunk=32, compute_dtype=compute_dtype,
                                  padding_row=True, grad_rows=grad_rows)
        (0.7 * loss).backward()
        return loss.detach(), hh.grad, id_block.grad, missing.grad

    ref = run(None)
    got = run([None, torch.tensor(rows, dtype=torch.long), None])
    assert torch.allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1:], ref[1:], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert (got[3] != 0).any() == bool(rows)


def test_grad_rows_need_one_entry_per_block():
    h, blocks, targets = _blocks_case(4)
    with pytest.raises(ValueError, match="one entry per table block"):
        chunked_softmax_ce(h, blocks, targets, grad_rows=[None])


def test_grad_runs_join_neighbouring_blocks_that_need_every_row():
    rows = torch.tensor([2])
    spans = lambda runs: [(r.start, r.end, r.parts, r.rows is None) for r in runs]  # noqa: E731
    assert spans(_grad_runs([4, 5, 3], (True, False, False), (None,) * 3)) == [(0, 4, (0,), True)]
    assert spans(_grad_runs([4, 5, 3], (True, True, False), (None,) * 3)) == [(0, 9, (0, 1), True)]
    assert spans(_grad_runs([4, 5, 3], (True, False, True), (None,) * 3)) == [(0, 4, (0,), True), (9, 12, (2,), True)]
    assert spans(_grad_runs([4, 5, 3], (True, True, True), (None, rows, None))) == [
        (0, 4, (0,), True), (4, 9, (1,), False), (9, 12, (2,), True)]
    assert _grad_runs([4, 5, 3], (False, False, False), (None,) * 3) == []

def test_hand_computed_value_and_frozen_table():
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # scores [0, 1]; target 1: CE = log(1 + e) - 1
    loss = chunked_softmax_ce(h, table, torch.tensor([1]))
    assert loss.item() == pytest.approx(torch.log1p(torch.tensor(1.0).exp()).item() - 1.0, abs=1e-6)
    loss.backward()
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.allclose(h.grad, (p - torch.tensor([0.0, 1.0])) @ table)  # grad_h = (softmax - onehot) @ table


def _loss_and_grads(h, table, targets, **kwargs):
    h, table = h.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    loss = chunked_softmax_ce(h, table, targets, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, table.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bfloat16_loss_and_gradients_match_float32():
    g = torch.Generator().manual_seed(0)
    h, table = torch.randn(300, 64, generator=g) * 0.3, torch.randn(2000, 64, generator=g) * 0.3  # logits ~ +-2
    targets = torch.randint(0, 2000, (300,), generator=g)
    ref = _loss_and_grads(h, table, targets, chunk=128)
    low = _loss_and_grads(h, table, targets, chunk=128, compute_dtype=torch.bfloat16)
    assert abs(low[0].item() - ref[0].item()) < 2e-4 * ref[0].item()  # measured 2.4e-5
    assert _rel(low[1], ref[1]) < 1e-2 and _rel(low[2], ref[2]) < 1e-2  # measured 2.4e-3: bfloat16 rounding
    assert low[1].dtype == low[2].dtype == torch.float32
    assert not torch.equal(low[1], ref[1])  # it did compute in bfloat16
    # chunking does not change the bfloat16 result beyond summation order (which may move a gradient entry by
    # one bfloat16 step where the blocks' float32 partial sums round differently)
    whole = _loss_and_grads(h, table, targets, chunk=4096, compute_dtype=torch.bfloat16)
    assert torch.allclose(whole[0], low[0], rtol=1e-5) and _rel(whole[1], low[1]) < 1e-3


def test_cpu_autocast_picks_bfloat16_and_plain_calls_float32():
    g = torch.Generator().manual_seed(1)
    h, table = torch.randn(50, 16, generator=g), torch.randn(70, 16, generator=g)
    targets = torch.randint(0, 70, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _loss_and_grads(h, table, targets)
    explicit = _loss_and_grads(h, table, targets, compute_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(auto, explicit, strict=True))
    plain = _loss_and_grads(h, table, targets)
    assert all(torch.equal(a, b) for a, b in zip(plain, _loss_and_grads(h, table, targets,
                                                                          compute_dtype=torch.float32), strict=True))
    with pytest.raises(ValueError, match="compute_dtype"):
        chunked_softmax_ce(h, table, targets, compute_dtype=torch.float16)


def test_bfloat16_blocks_padded_to_a_row_quantum_leave_the_result_unchanged(monkeypatch):
    import cammsr.model.chunked_ce as chunked_ce

    g = torch.Generator().manual_seed(2)
    h, table = torch.randn(45, 32, generator=g) * 0.3, torch.randn(500, 32, generator=g) * 0.3
    targets = torch.randint(0, 500, (45,), generator=g)
    padded = _loss_and_grads(h, table, targets, chunk=40, compute_dtype=torch.bfloat16)  # 45 -> 64 rows
    monkeypatch.setattr(chunked_ce, "ROW_QUANTUM", 1)
    plain = _loss_and_grads(h, table, targets, chunk=40, compute_dtype=torch.bfloat16)
    assert padded[1].shape == (45, 32)
    assert torch.allclose(padded[0], plain[0], rtol=1e-5)  # no -log(1/N) of a padding row in the sum
    assert _rel(padded[1], plain[1]) < 1e-3 and _rel(padded[2], plain[2]) < 1e-3


def test_the_score_blocks_are_reused_between_calls_and_released_on_request():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=gen, requires_grad=True)
    h = torch.randn(30, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (30,), generator=gen)
    release_workspace()
    first = chunked_softmax_ce(h, table, targets, chunk=16)
    first.backward()
    grads = h.grad.clone(), table.grad.clone()
    kept = block_workspace(h.device, torch.float32, 16, 50)[0].data_ptr()
    h.grad, table.grad = None, None
    again = chunked_softmax_ce(h, table, targets, chunk=16)  # the same blocks, overwritten
    again.backward()
    assert block_workspace(h.device, torch.float32, 16, 50)[0].data_ptr() == kept
    assert torch.equal(again, first) and torch.equal(h.grad, grads[0]) and torch.equal(table.grad, grads[1])
    dense = F.cross_entropy(h @ table.T, targets, reduction="sum")
    assert torch.allclose(first, dense, rtol=1e-5)
    release_workspace()
    assert block_workspace(h.device, torch.float32, 1, 1)[0].numel() == 1  # a new, smaller one
