"""Full-softmax next-item cross-entropy, computed a block of targets at a time.

``chunked_softmax_ce(h, table, targets)`` has the value and gradients of
``F.cross_entropy(h @ table.T, targets, reduction="sum")``, but the [P, N] score matrix (P targets,
N items) never exists whole: each block of rows is scored, turned into log-probabilities (float32)
or probabilities (bfloat16) by one row-wise softmax kernel, then in place into its gradient
(softmax - one-hot), which is multiplied straight back into the gradients of ``h`` and ``table``.
Autograd would keep the scores and the log-probabilities ([P, N] each) for the backward pass and
allocate two more in it; a batch of long sequences has tens of thousands of targets, so that is
gigabytes (measured 10.8 GB peak RSS at P = 16,000, N = 11,925 vs 1.3 GB here) for the same
arithmetic. Gradients are computed in the forward pass, so this is for losses that are
backpropagated once (no double backward).

The two [chunk, N] blocks (scores, and the probabilities that become the gradient) live in one workspace
kept between calls (`block_workspace`), not allocated per block: with glibc's allocator tuned to keep freed
memory (`cammsr.core.malloc`), blocks of 50-100 MB allocated and freed between allocations of every other
size left the heap 70% free and growing by ~200 MB per epoch on toys.

``compute_dtype=torch.bfloat16`` runs the three matmuls (scores, d/dh, d/dtable) in bfloat16 with
float32 accumulation and the softmax on the bfloat16 scores (float32 inside the kernel), as CPU
autocast would, without the [P, N] float32 copies autocast's ``F.cross_entropy`` makes: on a CPU with
AMX/AVX512-BF16 that is 2-2.7x faster per step (benchmarks/README.md). The gradients carry bfloat16
rounding (relative ~3e-3, like autocast); the returned loss is -log of the bfloat16 target
probability (relative ~1e-5 on the sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# targets per block: the workspace holds two [1024, N] blocks (49 MB in bfloat16 at N = 12k); 1,024 and 2,048 rows
# measured the same per step on a CPU with AVX512-BF16 (45 / 92 ms forward + backward at d = 64 / 192)
CHUNK_ROWS = 1024
# bfloat16 blocks are padded to a multiple of this many rows: oneDNN builds a kernel per matmul shape and
# keeps 1,024; one per distinct target count (hundreds in an epoch, x 3 matmuls) would keep rebuilding them
ROW_QUANTUM = 32


_workspace: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def block_workspace(device: torch.device, dtype: torch.dtype, rows: int, cols: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contiguous [rows, cols] blocks of one buffer kept per (device, dtype) and grown when too small
    (one buffer per kind: a training loop runs one CE at a time)."""
    key = (torch.device(device), dtype)
    buf = _workspace.get(key)
    if buf is None or buf.numel() < 2 * rows * cols:
        _workspace.pop(key, None)  # free the smaller one first
        buf = _workspace[key] = torch.empty(2 * rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols), buf[rows * cols : 2 * rows * cols].view(rows, cols)


def release_workspace() -> None:
    """Free the blocks `block_workspace` keeps (e.g. after training, before a long evaluation)."""
    _workspace.clear()


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, chunk: int, compute_dtype: torch.dtype,
                padding_row: bool, grad_rows: tuple, *parts: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit here
            return _forward(ctx, h, parts, grad_rows, targets, chunk, compute_dtype, padding_row)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, *grad_parts_t = ctx.saved_tensors
        need_parts = ctx.needs_input_grad[6:]
        return (grad_h * grad_out if ctx.needs_input_grad[0] else None, None, None, None, None, None,
                *(g.T * grad_out if need else None for g, need in zip(grad_parts_t, need_parts, strict=True)))


@dataclass(frozen=True)
class _GradRun:
    """Columns [start, end) of the table whose gradient one matmul per block of targets computes: the blocks
    ``parts`` (side by side), at every row (``rows`` None) or at ``rows`` only."""

    start: int
    end: int
    parts: tuple[int, ...]
    rows: torch.Tensor | None


def _grad_runs(widths: list[int], need: tuple[bool, ...], grad_rows: tuple) -> list[_GradRun]:
    """The blocks that need a gradient, neighbours needing every row joined into one run."""
    runs: list[_GradRun] = []
    start = 0
    for j, (w, n, rows) in enumerate(zip(widths, need, grad_rows, strict=True)):
        last = runs[-1] if runs else None
        if n and rows is None and last is not None and last.rows is None and last.end == start:
            runs[-1] = _GradRun(last.start, start + w, (*last.parts, j), None)
        elif n:
            runs.append(_GradRun(start, start + w, (j,), rows))
        start += w
    return runs


def _forward(ctx, h: torch.Tensor, parts: tuple[torch.Tensor, ...], grad_rows: tuple, targets: torch.Tensor,
             chunk: int, compute_dtype: torch.dtype, padding_row: bool) -> torch.Tensor:
    low = compute_dtype != torch.float32
    hx = h.to(compute_dtype)  # [P, d] (no copy in float32)
    tx = parts[0].to(compute_dtype) if len(parts) == 1 else torch.cat([t.to(compute_dtype) for t in parts], 1)  # [N, d]
    P = len(h)
    if low and h.device.type == "cpu" and P % ROW_QUANTUM:  # zero rows to a whole quantum, left out below
        pad = ROW_QUANTUM - P % ROW_QUANTUM
        hx = torch.cat([hx, hx.new_zeros(pad, hx.shape[1])])
        targets = torch.cat([targets, targets.new_zeros(pad)])
    loss = h.new_zeros((), dtype=torch.float32)
    widths = [t.shape[1] for t in parts]
    runs = _grad_runs(widths, tuple(ctx.needs_input_grad[6:]), grad_rows)
    need_h, need_table = ctx.needs_input_grad[0], bool(runs)
    grad_h = torch.empty_like(h) if need_h else None
    # per run [d_run, N or rows]: h.T @ grad writes it contiguously (grad.T @ h into [N, d] measured 2.5x slower)
    grad_runs_t: list[torch.Tensor | None] = [None] * len(runs)
    rows = torch.arange(min(chunk, len(hx)), device=h.device)
    score_block, prob_block = block_workspace(h.device, hx.dtype, min(chunk, len(hx)), len(tx))
    for start in range(0, P, chunk):  # a block of padding rows only (chunk < ROW_QUANTUM) is skipped
        hc, tc = hx[start : start + chunk], targets[start : start + chunk]  # [c, d], [c]
        real = min(len(tc), P - start)  # rows beyond P are padding
        logits = torch.mm(hc, tx.T, out=score_block[: len(tc)])  # [c, N]
        if padding_row:
            logits[:, 0] = float("-inf")  # never a target: probability 0, so its gradient is 0 too
        if low:  # probabilities straight from the bfloat16 scores (the kernel works in float32)
            grad = torch.ops.aten._softmax.out(logits, 1, False, out=prob_block[: len(tc)])  # [c, N]
            p_target = grad[:real].gather(1, tc[:real, None]).float()
            loss -= p_target.clamp_(min=torch.finfo(torch.float32).tiny).log_().sum()
        else:
            logp = torch.ops.aten._log_softmax.out(logits, 1, False, out=prob_block[: len(tc)])  # one row pass
            loss -= logp.gather(1, tc[:, None]).sum()
            grad = logp.exp_()  # softmax, in place
        if not (need_h or need_table):
            continue
        grad[rows[: len(tc)], tc] -= 1.0  # d CE / d logits = softmax - one-hot
        grad[real:] = 0  # padding rows: no gradient
        if need_h:
            grad_h[start : start + real] = (grad @ tx)[:real]  # [c, d]
        for r, run in enumerate(runs):
            cols = grad if run.rows is None else grad.index_select(1, run.rows)  # [c, N or R]
            part = hc[:, run.start : run.end].T @ cols  # [d_run, N or R]
            grad_runs_t[r] = part.float() if grad_runs_t[r] is None else grad_runs_t[r].add_(part)
    grad_parts_t = [parts[0].new_zeros(0)] * len(parts)  # placeholders where no gradient is needed
    for run, g in zip(runs, grad_runs_t, strict=True):
        if run.rows is not None:  # the other rows' gradient is 0 (their entries do not depend on what is learned)
            full = parts[0].new_zeros(run.end - run.start, len(tx))
            g = full if g is None else full.index_copy_(1, run.rows, g)
        elif g is None:  # no targets at all
            g = parts[0].new_zeros(run.end - run.start, len(tx))
        offset = 0
        for j in run.parts:
            grad_parts_t[j] = g[offset : offset + widths[j]]  # [d_j, N]
            offset += widths[j]
    ctx.save_for_backward(grad_h, *grad_parts_t)
    return loss


def chunked_softmax_ce(h: torch.Tensor, table: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor,
                       chunk: int = CHUNK_ROWS, compute_dtype: torch.dtype | None = None,
                       padding_row: bool = False, grad_rows: Sequence[torch.Tensor | None] | None = None
                       ) -> torch.Tensor:
    """Summed CE of scores ``h @ table.T`` against ``targets``, block by block.

    Args:
        h: FloatTensor [P, d] one row per target position.
        table: FloatTensor [N, d] the items that can be predicted, or its column blocks side by side
            ([N, d_1], [N, d_2], ...: the table is their concatenation); a block that needs no gradient gets none.
        grad_rows: per block (with ``table`` in blocks), None or LongTensor [R] the only rows whose gradient is
            wanted: the others get 0, and the gradient matmul of that block runs over R items instead of N. For a
            block that is fixed except at a few rows (CAMMSR's frozen text and image tables, learned only in the
            missing vector of the items without that content): the same gradients, a third of the matmul.
        targets: LongTensor [P] column of each row's target in ``table``.
        chunk: rows scored at once.
        compute_dtype: dtype of the matmuls and the softmax input (float32 or bfloat16); None: bfloat16
            under CPU autocast to bfloat16, else float32.
        padding_row: row 0 of ``table`` is padding, never predicted (its score is -inf, its gradient 0):
            the loss of ``table[1:]`` and ``targets - 1``, without slicing the table (whose backward would
            copy the whole table's gradient into a zero-padded one every step).

    Under CUDA autocast this falls back to ``F.cross_entropy`` on the whole score matrix (CUDA AMP as before).
    """
    parts = (table,) if isinstance(table, torch.Tensor) else tuple(table)
    grad_rows = (None,) * len(parts) if grad_rows is None else tuple(grad_rows)
    if len(grad_rows) != len(parts):
        raise ValueError(f"grad_rows: one entry per table block expected ({len(parts)}), found {len(grad_rows)}")
    device = h.device.type
    if device != "cpu" and torch.is_autocast_enabled(device):
        table = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if padding_row:
            table, targets = table[1:], targets - 1
        return F.cross_entropy(h @ table.T, targets, reduction="sum")
    if compute_dtype is None:
        cpu_bf16 = device == "cpu" and torch.is_autocast_enabled("cpu") \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        compute_dtype = torch.bfloat16 if cpu_bf16 else torch.float32
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"compute_dtype: expected float32 or bfloat16, found {compute_dtype}")
    return _ChunkedSoftmaxCE.apply(h.float(), targets, chunk, compute_dtype, padding_row, grad_rows,
                                   *(t.float() for t in parts))
