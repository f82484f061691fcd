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

import torch
import torch.nn.functional as F

CHUNK_ROWS = 2048  # targets per block: one block of [2048, N] floats; smaller blocks measured slower on CPU
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
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype, padding_row: bool) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit here
            return _forward(ctx, h, table, targets, chunk, compute_dtype, padding_row)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_table_t = ctx.saved_tensors
        return (grad_h * grad_out if ctx.needs_input_grad[0] else None,
                grad_table_t.T * grad_out if ctx.needs_input_grad[1] else None, None, None, None, None)


def _forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, chunk: int,
             compute_dtype: torch.dtype, padding_row: bool) -> torch.Tensor:
    low = compute_dtype != torch.float32
    hx, tx = h.to(compute_dtype), table.to(compute_dtype)  # [P, d], [N, d] (no copy in float32)
    P = len(h)
    if low and h.device.type == "cpu" and P % ROW_QUANTUM:  # zero rows to a whole quantum, left out below
        pad = ROW_QUANTUM - P % ROW_QUANTUM
        hx = torch.cat([hx, hx.new_zeros(pad, hx.shape[1])])
        targets = torch.cat([targets, targets.new_zeros(pad)])
    loss = h.new_zeros((), dtype=torch.float32)
    need_h, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.empty_like(h) if need_h else None
    grad_table_t = None  # [d, N]: h.T @ grad writes it contiguously (grad.T @ h into [N, d] measured 2.5x slower)
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
        if need_table:
            part = hc.T @ grad  # [d, N]
            grad_table_t = part.float() if grad_table_t is None else grad_table_t.add_(part)
    if need_table and grad_table_t is None:  # no rows at all
        grad_table_t = table.new_zeros(table.shape[1], table.shape[0])
    ctx.save_for_backward(grad_h, grad_table_t)
    return loss


def chunked_softmax_ce(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                       chunk: int = CHUNK_ROWS, compute_dtype: torch.dtype | None = None,
                       padding_row: bool = False) -> torch.Tensor:
    """Summed CE of scores ``h @ table.T`` against ``targets``, block by block.

    Args:
        h: FloatTensor [P, d] one row per target position.
        table: FloatTensor [N, d] the items that can be predicted.
        targets: LongTensor [P] column of each row's target in ``table``.
        chunk: rows scored at once.
        compute_dtype: dtype of the matmuls and the softmax input (float32 or bfloat16); None: bfloat16
            under CPU autocast to bfloat16, else float32.
        padding_row: row 0 of ``table`` is padding, never predicted (its score is -inf, its gradient 0):
            the loss of ``table[1:]`` and ``targets - 1``, without slicing the table (whose backward would
            copy the whole table's gradient into a zero-padded one every step).

    Under CUDA autocast this falls back to ``F.cross_entropy`` on the whole score matrix (CUDA AMP as before).
    """
    device = h.device.type
    if device != "cpu" and torch.is_autocast_enabled(device):
        if padding_row:
            table, targets = table[1:], targets - 1
        return F.cross_entropy(h @ table.T, targets, reduction="sum")
    if compute_dtype is None:
        cpu_bf16 = device == "cpu" and torch.is_autocast_enabled("cpu") \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        compute_dtype = torch.bfloat16 if cpu_bf16 else torch.float32
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"compute_dtype: expected float32 or bfloat16, found {compute_dtype}")
    return _ChunkedSoftmaxCE.apply(h.float(), table.float(), targets, chunk, compute_dtype, padding_row)
