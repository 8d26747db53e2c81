"""Triton kernels for the input-sized stages of evonorm.fused (used for CUDA inputs; imported only when needed).

Each public function is the twin of a ``*_plain`` stage of evonorm.fused and takes the same arguments: x and gy as
contiguous (R, L) = (N*C, H*W) rows, every factor as a contiguous (R, 1) column, and returns the same results
(float32 in, float32 out: fused.py converts inputs to the statistics dtype before the stages). Arithmetic is in
float32 whatever the pointer dtype. Kernels work on (BLOCK_R, BLOCK_L) tiles, so that a tile holds many short rows
(7x7 maps) or a chunk of one long row; reductions give each program a block of rows and loop over L.

With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

TILE = 1024  # elements per tile
MAX_COLS = 1024  # longest row chunk of a tile


def _tile_shape(rows: int, cols: int) -> tuple[int, int]:
    block_l = min(triton.next_power_of_2(cols), MAX_COLS)
    return min(max(TILE // block_l, 1), triton.next_power_of_2(rows)), block_l


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check(x: torch.Tensor, like_x: list[torch.Tensor], factors: tuple[torch.Tensor, ...]) -> None:
    """Offsets assume contiguous rows and one factor value per row."""
    if any(t.shape != x.shape or not t.is_contiguous() for t in [x, *like_x]) or any(
            not f.is_contiguous() or f.numel() != x.shape[0] for f in factors):
        raise ValueError("triton stages need contiguous (R, L) rows and (R, 1) factors")


@triton.jit
def _chunk(rows, start, R, L, BLOCK_L: tl.constexpr):
    """(element offsets, mask) of columns [start, start + BLOCK_L) of the given rows; int64 offsets: R * L may not
    fit 32 bits."""
    cols = start + tl.arange(0, BLOCK_L)
    mask = (rows < R)[:, None] & (cols < L)[None, :]
    return rows.to(tl.int64)[:, None] * L + cols[None, :], mask


@triton.jit
def _tile(R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """(rows, element offsets, mask) of this program's tile. The grid is 1D over tiles: a 2D grid's second axis
    stops at 65535 blocks."""
    col_blocks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs, mask = _chunk(rows, (pid % col_blocks) * BLOCK_L, R, L, BLOCK_L)
    return rows, offs, mask


@triton.jit
def _row(ptr, rows, R):
    """A per-row factor as a (BLOCK_R, 1) float32 column (0 past the last row)."""
    return tl.load(ptr + rows, mask=rows < R, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _batch_r(x, a, b):
    return tl.maximum(a * x + b, 1.0, propagate_nan=tl.PropagateNan.ALL)  # as torch.clamp_min: NaN stays NaN


@triton.jit
def _batch_forward_kernel(y_ptr, x_ptr, a_ptr, b_ptr, scale_ptr, bias_ptr, R, L,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, offs, mask = _tile(R, L, BLOCK_R, BLOCK_L)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r = _batch_r(x, _row(a_ptr, rows, R), _row(b_ptr, rows, R))
    y = x / r * _row(scale_ptr, rows, R) + _row(bias_ptr, rows, R)
    tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def _batch_sums_kernel(out_ptr, x_ptr, gy_ptr, a_ptr, b_ptr, R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """out (5, R): sums over each row of gy, gy t, q, q_inst, q_inst x (t = x / r, q = gy t / r)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    a, b = _row(a_ptr, rows, R), _row(b_ptr, rows, R)
    acc_gy = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_gy_t = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_inst = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_inst_x = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, mask = _chunk(rows, start, R, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 past the end: adds nothing
        r = _batch_r(x, a, b)
        t = x / r
        q = gy * t / r
        q_inst = tl.where(r > 1.0, q, 0.0)
        acc_gy += gy
        acc_gy_t += gy * t
        acc_q += q
        acc_q_inst += q_inst
        acc_q_inst_x += q_inst * x
    row_ok = rows < R
    tl.store(out_ptr + rows, tl.sum(acc_gy, axis=1), mask=row_ok)
    tl.store(out_ptr + R + rows, tl.sum(acc_gy_t, axis=1), mask=row_ok)
    tl.store(out_ptr + 2 * R + rows, tl.sum(acc_q, axis=1), mask=row_ok)
    tl.store(out_ptr + 3 * R + rows, tl.sum(acc_q_inst, axis=1), mask=row_ok)
    tl.store(out_ptr + 4 * R + rows, tl.sum(acc_q_inst_x, axis=1), mask=row_ok)


@triton.jit
def _stat_terms(x, rows, R, k1_ptr, center_ptr, k0_ptr):
    """k1 * (x - center) + k0: the input gradient through the statistics (see fused._add_stat_terms_eager)."""
    return _row(k1_ptr, rows, R) * (x - _row(center_ptr, rows, R)) + _row(k0_ptr, rows, R)


@triton.jit
def _batch_grad_x_kernel(gx_ptr, x_ptr, gy_ptr, a_ptr, b_ptr, scale_ptr, k1_ptr, center_ptr, k0_ptr, R, L,
                         BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, offs, mask = _tile(R, L, BLOCK_R, BLOCK_L)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    a = _row(a_ptr, rows, R)
    r = _batch_r(x, a, _row(b_ptr, rows, R))
    q_inst = tl.where(r > 1.0, gy * x / (r * r), 0.0)
    gx = (gy / r - a * q_inst) * _row(scale_ptr, rows, R) + _stat_terms(x, rows, R, k1_ptr, center_ptr, k0_ptr)
    tl.store(gx_ptr + offs, gx, mask=mask)


@triton.jit
def _sample_forward_kernel(y_ptr, x_ptr, v_ptr, scale_ptr, bias_ptr, R, L,
                           BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, offs, mask = _tile(R, L, BLOCK_R, BLOCK_L)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = x * tl.sigmoid(_row(v_ptr, rows, R) * x) * _row(scale_ptr, rows, R) + _row(bias_ptr, rows, R)
    tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def _sample_sums_kernel(out_ptr, x_ptr, gy_ptr, v_ptr, R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """out (3, R): sums over each row of gy, gy num, gy num x (1 - s) (num = x s, s = sigmoid(v x))."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    v = _row(v_ptr, rows, R)
    acc_gy = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_gy_num = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, mask = _chunk(rows, start, R, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(v * x)
        gy_num = gy * x * s
        acc_gy += gy
        acc_gy_num += gy_num
        acc_v += gy_num * x * (1 - s)
    row_ok = rows < R
    tl.store(out_ptr + rows, tl.sum(acc_gy, axis=1), mask=row_ok)
    tl.store(out_ptr + R + rows, tl.sum(acc_gy_num, axis=1), mask=row_ok)
    tl.store(out_ptr + 2 * R + rows, tl.sum(acc_v, axis=1), mask=row_ok)


@triton.jit
def _sample_grad_x_kernel(gx_ptr, x_ptr, gy_ptr, v_ptr, scale_ptr, k1_ptr, center_ptr, k0_ptr, R, L,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, offs, mask = _tile(R, L, BLOCK_R, BLOCK_L)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    z = _row(v_ptr, rows, R) * x
    s = tl.sigmoid(z)
    gx = gy * (s + z * s * (1 - s)) * _row(scale_ptr, rows, R) + _stat_terms(x, rows, R, k1_ptr, center_ptr, k0_ptr)
    tl.store(gx_ptr + offs, gx, mask=mask)


def _elementwise(kernel, out: torch.Tensor, x: torch.Tensor, gy: torch.Tensor | None, *factors) -> torch.Tensor:
    """Launch kernel(out, x, [gy,] *factors, R, L) over the (R, L) tiles."""
    rows = [x] if gy is None else [x, gy]
    _check(out, rows, factors)
    block_r, block_l = _tile_shape(*x.shape)
    grid = (triton.cdiv(x.shape[0], block_r) * triton.cdiv(x.shape[1], block_l),)
    with _on_device(x):
        kernel[grid](out, *rows, *factors, *x.shape, BLOCK_R=block_r, BLOCK_L=block_l)
    return out


def _row_sums(kernel, count: int, x: torch.Tensor, gy: torch.Tensor, *factors) -> tuple[torch.Tensor, ...]:
    """Launch kernel(out, x, gy, *factors, R, L) with one program per block of rows; ``count`` (R,) sums."""
    _check(x, [gy], factors)
    out = x.new_empty(count, x.shape[0])
    block_r, block_l = _tile_shape(*x.shape)
    with _on_device(x):
        kernel[(triton.cdiv(x.shape[0], block_r),)](out, x, gy, *factors, *x.shape, BLOCK_R=block_r, BLOCK_L=block_l)
    return tuple(out.unbind(0))


def batch_forward(buf, x, a, b, scale, bias):
    return _elementwise(_batch_forward_kernel, buf, x, None, a, b, scale, bias)


def batch_sums(x, gy, a, b):
    return _row_sums(_batch_sums_kernel, 5, x, gy, a, b)


def batch_grad_x(x, gy, a, b, scale, k1, center, k0):
    return _elementwise(_batch_grad_x_kernel, torch.empty_like(x), x, gy, a, b, scale, k1, center, k0)


def sample_forward(buf, x, v, scale, bias):
    return _elementwise(_sample_forward_kernel, buf, x, None, v, scale, bias)


def sample_sums(x, gy, v):
    return _row_sums(_sample_sums_kernel, 3, x, gy, v)


def sample_grad_x(x, gy, v, scale, k1, center, k0):
    return _elementwise(_sample_grad_x_kernel, torch.empty_like(x), x, gy, v, scale, k1, center, k0)
