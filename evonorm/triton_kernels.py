"""Triton kernels of the fast EvoNorms on CUDA (imported only when needed): a layer call is a few launches.

Forward: one statistics launch (mean and variance per (n, c) row for the B-series, per (n, group) row for the
S-series) and one element-wise launch that also does the small algebra (batch variance from the per-(n, c) moments,
coefficients, per-channel results). Backward: one launch for the per-(n, c) sums over (H, W) and one element-wise
launch for the input gradient that also reduces those sums over the batch or the group and writes the parameter
gradients. Reductions over N or over a group's channels are recomputed by every program that needs them from the
small per-(n, c) results (a few loads per row, cached), so no launch waits on a separate small-algebra kernel.

Everything small lives in one float32 workspace per call, allocated by the forward and kept for the backward
(``workspace_layout``): parameter gradients | mean | variance | batch std | backward sums. The backward returns
the parameter gradients as views of it. The programs that hold the first column chunk of the rows of sample 0 write
the per-channel results (batch std, running variance, parameter gradients): every channel has exactly one writer
and no program reads what another writes in the same launch, so results are deterministic.

x, y, grad_y and grad_x are read and written in their own dtype (float32, float16, bfloat16); all arithmetic is
float32. Inputs must be contiguous (N, C, H, W). No result goes back to the host: launches only.
With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

TILE = 1024  # elements per tile
MAX_COLS = 1024  # longest row chunk of a tile
MAX_ROWS = 128  # most rows of a tile (see _tile_shape)
SMALL_TILE = 4096  # (rows, batch or group members) tile of the inline reductions over N or a group
BATCH_VARIANTS = {"b0": 0, "b1": 1, "b2": 2}
BATCH_SUMS = 5  # per (n, c): gy, gy t, q on the batch branch, q on the instance branch, q x on the instance branch
SAMPLE_SUMS = 3  # per (n, c): gy, gy num, gy num x (1 - s)


def workspace_layout(n: int, c: int, stat_rows: int, sums: int) -> dict[str, tuple[int, int]]:
    """(offset, length) of each part of the float32 workspace; must match ``_layout`` below."""
    sizes = {"grad_weight": c, "grad_bias": c, "grad_v": c, "mean": stat_rows, "var": stat_rows, "batch_std": c,
             "sums": sums * n * c}
    layout, offset = {}, 0
    for name, size in sizes.items():
        layout[name] = (offset, size)
        offset += size
    return layout


@triton.jit
def _layout(ws_ptr, C, S):
    """Pointers to the mean, variance, batch std and sums parts of the workspace (S statistics rows)."""
    mean_ptr = ws_ptr + 3 * C
    var_ptr = mean_ptr + S
    bstd_ptr = var_ptr + S
    return mean_ptr, var_ptr, bstd_ptr, bstd_ptr + C


def _pow2(n: int) -> int:
    """Smallest power of two >= n. Plain Python: ``triton.next_power_of_2`` and ``triton.cdiv`` are JIT functions that
    cost microseconds per call from the host, and a layer call's host time is what limits small maps."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_shape(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_L). At most MAX_ROWS rows: a (1024, 4) tile of the inline batch reductions summed only its
    first column on an H200 (Triton 3.6), while tiles of up to 128 rows were right (tests/test_triton_kernels.py)."""
    block_l = min(_pow2(cols), MAX_COLS)
    return min(max(TILE // block_l, 1), _pow2(rows), MAX_ROWS), block_l


def _small_block(count: int, block_r: int) -> int:
    """Members (batch samples, group channels) per step of an inline reduction for block_r rows."""
    return max(1, min(_pow2(count), SMALL_TILE // block_r))


class _Geometry(NamedTuple):
    """Launch geometry of a contiguous (N, C, H, W) input seen as (N*C, H*W) rows."""
    n: int
    c: int
    length: int
    block_r: int
    block_l: int
    block_n: int  # batch samples per step of the inline reductions over N
    row_grid: tuple[int]  # one program per block of rows (reductions over a row)
    tile_grid: tuple[int]  # one program per (rows, columns) tile (element-wise)

    @property
    def rows(self) -> int:
        return self.n * self.c


@functools.lru_cache(maxsize=1024)
def _geometry_of(n: int, c: int, length: int) -> _Geometry:
    block_r, block_l = _tile_shape(n * c, length)
    row_blocks = _cdiv(n * c, block_r)
    return _Geometry(n, c, length, block_r, block_l, _small_block(n, block_r), (row_blocks,),
                     (row_blocks * _cdiv(length, block_l),))


def _geometry(x: torch.Tensor) -> _Geometry:
    n, c = x.shape[:2]
    return _geometry_of(n, c, x.numel() // (n * c))


@functools.lru_cache(maxsize=1024)
def _workspace_size(n: int, c: int, stat_rows: int, sums: int) -> int:
    return sum(length for _, length in workspace_layout(n, c, stat_rows, sums).values())


def _workspace(x: torch.Tensor, stat_rows: int, sums: int) -> torch.Tensor:
    n, c = x.shape[:2]
    return x.new_empty(_workspace_size(n, c, stat_rows, sums), dtype=torch.float32)


def _parameter_grads(ws: torch.Tensor, c: int, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_weight, grad_bias, grad_v or None): the head of the workspace, as the grad_x kernels wrote it."""
    grad_weight, grad_bias, grad_v, _ = ws.split([c, c, c, ws.numel() - 3 * c])
    return grad_weight, grad_bias, None if v is None else grad_v


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch(kernel, grid: tuple[int], *args, **meta) -> None:
    """Every kernel launch of this module (tests count launches here)."""
    kernel[grid](*args, **meta)


@triton.jit
def _chunk(rows, start, R, L, BLOCK_L: tl.constexpr):
    """(element offsets, mask) of columns [start, start + BLOCK_L) of the given rows; int64 offsets: R * L may not
    fit 32 bits."""
    cols = start + tl.arange(0, BLOCK_L)
    mask = (rows < R)[:, None] & (cols < L)[None, :]
    return rows.to(tl.int64)[:, None] * L + cols[None, :], mask


@triton.jit
def _tile(N, C, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's tile of the (N*C, L) rows: (rows, their channels, valid rows, element offsets, mask, writer
    rows: the rows of sample 0 when the tile holds their first column chunk). The grid is 1D over tiles: a 2D
    grid's second axis stops at 65535 blocks."""
    col_blocks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs, mask = _chunk(rows, (pid % col_blocks) * BLOCK_L, N * C, L, BLOCK_L)
    ok = rows < N * C
    return rows, rows % C, ok, offs, mask, ok & (rows < C) & (pid % col_blocks == 0)


@triton.jit
def _load(ptr, idx, mask):
    return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sum_over_batch(ptr, c, ok, N, C, BLOCK_N: tl.constexpr):
    """sum over n of ptr[n * C + c] for each row's channel c."""
    acc = tl.zeros(c.shape, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = ok[:, None] & (n < N)[None, :]
        acc += tl.sum(_load(ptr, n[None, :] * C + c[:, None], m), axis=1)
    return acc


@triton.jit
def _moments_kernel(ws_ptr, x_ptr, R, L, C, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Mean and biased variance of each of the R rows of length L into the workspace: exact two-pass moments of
    each chunk, merged across chunks (Chan et al.), so a large mean against a small spread loses nothing."""
    mean_ptr, var_ptr, _, _ = _layout(ws_ptr, C, R)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mean = tl.zeros((BLOCK_R,), tl.float32)
    m2 = tl.zeros((BLOCK_R,), tl.float32)
    count = 0.0
    for start in range(0, L, BLOCK_L):
        offs, mask = _chunk(rows, start, R, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.minimum(L - start, BLOCK_L).to(tl.float32)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_b / total)
        count = total
    ok = rows < R
    tl.store(mean_ptr + rows, mean, mask=ok)
    tl.store(var_ptr + rows, m2 / L, mask=ok)


def _moments(ws: torch.Tensor, x: torch.Tensor, channels: int, rows: int) -> None:
    """Mean and variance of x seen as ``rows`` rows (N*C for the B-series, N*groups for the S-series)."""
    length = x.numel() // rows
    block_r, block_l = _tile_shape(rows, length)
    _launch(_moments_kernel, (_cdiv(rows, block_r),), ws, x, rows, length, channels,
            BLOCK_R=block_r, BLOCK_L=block_l)


# ---------------------------------------------------------------------------------------------------------------
# B-series: y = x / r * scale + bias, r = max(a x + b, 1), a = alpha / batch_std, b = beta / batch_std,
# scale = weight / batch_std, instance term alpha x + beta (see evonorm.fused for the derivation).


@triton.jit
def _batch_variance(mean_ptr, var_ptr, c, ok, N, C, BLOCK_N: tl.constexpr):
    """Variance over (N, H, W) from the per-(n, c) moments: mean of the variances + variance of the means."""
    batch_mean = _sum_over_batch(mean_ptr, c, ok, N, C, BLOCK_N) / N
    acc = tl.zeros(c.shape, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = ok[:, None] & (n < N)[None, :]
        idx = n[None, :] * C + c[:, None]
        d = tl.where(m, _load(mean_ptr, idx, m) - batch_mean[:, None], 0.0)
        acc += tl.sum(_load(var_ptr, idx, m) + d * d, axis=1)
    return acc / N


@triton.jit
def _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT: tl.constexpr):
    """Per row: mean, alpha, beta with instance term = alpha x + beta."""
    mean = _load(mean_ptr, rows, ok)
    var = _load(var_ptr, rows, ok)
    if VARIANT == 0:  # b0: v x + sqrt(var_{H,W} + eps)
        alpha = _load(v_ptr, c, ok)
        beta = tl.sqrt(var + eps)
    else:
        beta = tl.sqrt(var + mean * mean + eps)  # rms = sqrt(mean_{H,W}(x^2) + eps)
        if VARIANT == 1:  # b1: (x + 1) rms
            alpha = beta
        else:  # b2: rms - x
            alpha = tl.full(beta.shape, -1.0, tl.float32)
    return mean, alpha, beta


@triton.jit
def _batch_coefficients(ws_ptr, w_ptr, v_ptr, rows, ok, C, R, eps, VARIANT: tl.constexpr):
    """Per row, from the forward's workspace: mean, alpha, beta, batch std, weight."""
    mean_ptr, var_ptr, bstd_ptr, _ = _layout(ws_ptr, C, R)
    c = rows % C
    mean, alpha, beta = _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT)
    bstd = tl.load(bstd_ptr + c, mask=ok, other=1.0)
    return mean, alpha, beta, bstd, _load(w_ptr, c, ok)


@triton.jit
def _batch_r(x, a, b):
    return tl.maximum(a[:, None] * x + b[:, None], 1.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN


@triton.jit
def _batch_forward_kernel(y_ptr, x_ptr, ws_ptr, w_ptr, bias_ptr, v_ptr, rv_ptr, N, C, L, eps, momentum,
                          VARIANT: tl.constexpr, TRAINING: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, c, ok, offs, mask, writer = _tile(N, C, L, BLOCK_R, BLOCK_L)
    mean_ptr, var_ptr, bstd_ptr, _ = _layout(ws_ptr, C, N * C)
    if TRAINING:
        batch_var = _batch_variance(mean_ptr, var_ptr, c, ok, N, C, BLOCK_N)
    else:
        batch_var = _load(rv_ptr, c, ok)
    bstd = tl.sqrt(batch_var + eps)
    tl.store(bstd_ptr + c, bstd, mask=writer)  # read by the backward only
    if TRAINING:  # rv <- lerp(rv, batch_var, momentum) where the batch variance is finite (torch.lerp's formula)
        rv = _load(rv_ptr, c, writer)
        new = tl.where(momentum < 0.5, rv + momentum * (batch_var - rv),
                       batch_var - (batch_var - rv) * (1.0 - momentum))
        new = tl.where(batch_var - batch_var == 0.0, new, rv)
        tl.store(rv_ptr + c, new.to(rv_ptr.dtype.element_ty), mask=writer)
    _, alpha, beta = _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r = _batch_r(x, alpha / bstd, beta / bstd)
    y = x / r * (_load(w_ptr, c, ok) / bstd)[:, None] + _load(bias_ptr, c, ok)[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_sums_kernel(ws_ptr, x_ptr, gy_ptr, w_ptr, v_ptr, N, C, L, eps, VARIANT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per-(n, c) sums over (H, W) of gy, gy t, q_batch, q_inst, q_inst x (t = x / r, q = gy t / r split by the
    branch of max())."""
    R = N * C
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    _, alpha, beta, bstd, _ = _batch_coefficients(ws_ptr, w_ptr, v_ptr, rows, ok, C, R, eps, VARIANT)
    a, b = alpha / bstd, beta / bstd
    acc_gy = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_gy_t = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_batch = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_inst = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_inst_x = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, mask = _chunk(rows, start, R, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 past the end: adds nothing
        r = _batch_r(x, a, b)
        t = x / r
        q = gy * t / r
        inst = r > 1.0
        q_inst = tl.where(inst, q, 0.0)
        acc_gy += gy
        acc_gy_t += gy * t
        acc_q_batch += tl.where(inst, 0.0, q)
        acc_q_inst += q_inst
        acc_q_inst_x += q_inst * x
    _, _, _, sums_ptr = _layout(ws_ptr, C, R)
    tl.store(sums_ptr + rows, tl.sum(acc_gy, axis=1), mask=ok)
    tl.store(sums_ptr + R + rows, tl.sum(acc_gy_t, axis=1), mask=ok)
    tl.store(sums_ptr + 2 * R + rows, tl.sum(acc_q_batch, axis=1), mask=ok)
    tl.store(sums_ptr + 3 * R + rows, tl.sum(acc_q_inst, axis=1), mask=ok)
    tl.store(sums_ptr + 4 * R + rows, tl.sum(acc_q_inst_x, axis=1), mask=ok)


@triton.jit
def _batch_grad_x_kernel(gx_ptr, x_ptr, gy_ptr, ws_ptr, w_ptr, v_ptr, N, C, L, eps,
                         VARIANT: tl.constexpr, TRAINING: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    """grad_x = (gy / r - a q_inst) scale + k1 (x - mean) + k0, and the parameter gradients (writers)."""
    R = N * C
    rows, c, ok, offs, mask, writer = _tile(N, C, L, BLOCK_R, BLOCK_L)
    mean_ptr, _, _, sums_ptr = _layout(ws_ptr, C, R)
    mean, alpha, beta, bstd, w = _batch_coefficients(ws_ptr, w_ptr, v_ptr, rows, ok, C, R, eps, VARIANT)
    w_ss = w / (bstd * bstd)  # dL/d den = -w_ss q
    g_beta = -w_ss * _load(sums_ptr + 3 * R, rows, ok)
    if VARIANT == 0:  # beta = sqrt(var + eps): d beta / dx = (x - mean) / (L beta)
        k1 = g_beta / (beta * L)
        k0 = tl.zeros(k1.shape, tl.float32)
    else:  # beta = rms: d rms / dx = x / (L rms) = ((x - mean) + mean) / (L rms); b1 also has alpha = rms
        if VARIANT == 1:
            g_beta += -w_ss * _load(sums_ptr + 4 * R, rows, ok)
        k1 = g_beta / (beta * L)
        k0 = k1 * mean
    if TRAINING:  # d batch_std / dx = (x - batch_mean) / (N L batch_std)
        k_batch = -w_ss * _sum_over_batch(sums_ptr + 2 * R, c, ok, N, C, BLOCK_N) / (bstd * N * L)
        batch_mean = _sum_over_batch(mean_ptr, c, ok, N, C, BLOCK_N) / N
        k1 += k_batch
        k0 += k_batch * (mean - batch_mean)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    a = alpha / bstd
    r = _batch_r(x, a, beta / bstd)
    q_inst = tl.where(r > 1.0, gy * x / (r * r), 0.0)
    gx = (gy / r - a[:, None] * q_inst) * (w / bstd)[:, None] + k1[:, None] * (x - mean[:, None]) + k0[:, None]
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(ws_ptr + c, _sum_over_batch(sums_ptr + R, c, writer, N, C, BLOCK_N) / bstd, mask=writer)
    tl.store(ws_ptr + C + c, _sum_over_batch(sums_ptr, c, writer, N, C, BLOCK_N), mask=writer)
    if VARIANT == 0:
        tl.store(ws_ptr + 2 * C + c, -w_ss * _sum_over_batch(sums_ptr + 4 * R, c, writer, N, C, BLOCK_N),
                 mask=writer)


def batch_forward(x, weight, bias, v, running_var, variant: str, eps: float, momentum: float, training: bool):
    """(y, workspace); in training the running variance is updated in place."""
    g = _geometry(x)
    ws, y = _workspace(x, g.rows, BATCH_SUMS), torch.empty_like(x)
    with _on_device(x):
        _moments(ws, x, g.c, g.rows)
        _launch(_batch_forward_kernel, g.tile_grid, y, x, ws, weight, bias, weight if v is None else v, running_var,
                g.n, g.c, g.length, eps, momentum, VARIANT=BATCH_VARIANTS[variant], TRAINING=training,
                BLOCK_R=g.block_r, BLOCK_L=g.block_l, BLOCK_N=g.block_n)
    return y, ws


def batch_backward(x, grad_y, ws, weight, v, variant: str, eps: float, training: bool):
    """(grad_x, grad_weight, grad_bias, grad_v or None); parameter gradients are views of the workspace."""
    g = _geometry(x)
    grad_x = torch.empty_like(x)
    args = g.n, g.c, g.length, eps
    meta = {"VARIANT": BATCH_VARIANTS[variant], "BLOCK_R": g.block_r, "BLOCK_L": g.block_l}
    with _on_device(x):
        _launch(_batch_sums_kernel, g.row_grid, ws, x, grad_y, weight, weight if v is None else v, *args, **meta)
        _launch(_batch_grad_x_kernel, g.tile_grid, grad_x, x, grad_y, ws, weight, weight if v is None else v, *args,
                TRAINING=training, BLOCK_N=g.block_n, **meta)
    return (grad_x, *_parameter_grads(ws, g.c, v))


def batch_saved_stats(ws: torch.Tensor, n: int, c: int):
    """(mean (N, C), var (N, C), batch std (C,)) from a forward's workspace: what the eager backward needs."""
    layout = workspace_layout(n, c, n * c, BATCH_SUMS)
    mean, var, bstd = (ws.narrow(0, *layout[name]) for name in ("mean", "var", "batch_std"))
    return mean.view(n, c), var.view(n, c), bstd


# ---------------------------------------------------------------------------------------------------------------
# S-series: y = x sigmoid(v x) rstd weight + bias per (n, group) rstd; v = 1 without HAS_V.


@triton.jit
def _group_rstd(mean_ptr, var_ptr, grp, ok, eps, CENTERED: tl.constexpr):
    """1 / sqrt(var + eps) (CENTERED) or 1 / sqrt(mean(x^2) + eps) of each row's group; and the group's center
    (mean, or 0 for the second moment)."""
    mean = _load(mean_ptr, grp, ok)
    var = _load(var_ptr, grp, ok)
    if CENTERED:
        center = mean
    else:
        var += mean * mean
        center = tl.zeros(mean.shape, tl.float32)
    return 1.0 / tl.sqrt(var + eps), center


@triton.jit
def _rstd_dot_over_batch(ptr, mean_ptr, var_ptr, c, ok, N, C, G, eps, CENTERED: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """sum over n of ptr[n * C + c] * rstd[n, group of c] for each row's channel c."""
    acc = tl.zeros(c.shape, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = ok[:, None] & (n < N)[None, :]
        rstd, _ = _group_rstd(mean_ptr, var_ptr, n[None, :] * G + (c // (C // G))[:, None], m, eps, CENTERED)
        acc += tl.sum(_load(ptr, n[None, :] * C + c[:, None], m) * rstd, axis=1)
    return acc


@triton.jit
def _sample_forward_kernel(y_ptr, x_ptr, ws_ptr, w_ptr, bias_ptr, v_ptr, N, C, L, G, eps,
                           HAS_V: tl.constexpr, CENTERED: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows, c, ok, offs, mask, _ = _tile(N, C, L, BLOCK_R, BLOCK_L)
    mean_ptr, var_ptr, _, _ = _layout(ws_ptr, C, N * G)
    rstd, _ = _group_rstd(mean_ptr, var_ptr, (rows // C) * G + c // (C // G), ok, eps, CENTERED)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    z = _load(v_ptr, c, ok)[:, None] * x if HAS_V else x
    y = x * tl.sigmoid(z) * (rstd * _load(w_ptr, c, ok))[:, None] + _load(bias_ptr, c, ok)[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sample_sums_kernel(ws_ptr, x_ptr, gy_ptr, v_ptr, N, C, L, G, HAS_V: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per-(n, c) sums over (H, W) of gy, gy num, gy num x (1 - s) (num = x s, s = sigmoid(v x))."""
    R = N * C
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    v = _load(v_ptr, rows % C, ok)[:, None] if HAS_V else 1.0
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
    _, _, _, sums_ptr = _layout(ws_ptr, C, N * G)
    tl.store(sums_ptr + rows, tl.sum(acc_gy, axis=1), mask=ok)
    tl.store(sums_ptr + R + rows, tl.sum(acc_gy_num, axis=1), mask=ok)
    tl.store(sums_ptr + 2 * R + rows, tl.sum(acc_v, axis=1), mask=ok)


@triton.jit
def _sample_grad_x_kernel(gx_ptr, x_ptr, gy_ptr, ws_ptr, w_ptr, v_ptr, N, C, L, G, eps,
                          HAS_V: tl.constexpr, CENTERED: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """grad_x = gy d num / dx scale + k1 (x - center), k1 = -g_rstd rstd^3 / (L C/G) with g_rstd the group's sum of
    weight gy num; and the parameter gradients (writers)."""
    R = N * C
    per_group = C // G
    rows, c, ok, offs, mask, writer = _tile(N, C, L, BLOCK_R, BLOCK_L)
    mean_ptr, var_ptr, _, sums_ptr = _layout(ws_ptr, C, N * G)
    rstd, center = _group_rstd(mean_ptr, var_ptr, (rows // C) * G + c // per_group, ok, eps, CENTERED)
    w = _load(w_ptr, c, ok)
    first_channel = c - c % per_group
    g_rstd = tl.zeros((BLOCK_R,), tl.float32)
    for j0 in range(0, per_group, BLOCK_G):
        j = j0 + tl.arange(0, BLOCK_G)
        m = ok[:, None] & (j < per_group)[None, :]
        channel = first_channel[:, None] + j[None, :]
        g_rstd += tl.sum(_load(w_ptr, channel, m) * _load(sums_ptr + R, (rows - c)[:, None] + channel, m), axis=1)
    k1 = -g_rstd * rstd * rstd * rstd / (per_group * L)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    v = _load(v_ptr, c, ok)[:, None] if HAS_V else 1.0
    z = v * x
    s = tl.sigmoid(z)
    gx = gy * (s + z * s * (1 - s)) * (rstd * w)[:, None] + k1[:, None] * (x - center[:, None])
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(ws_ptr + c, _rstd_dot_over_batch(sums_ptr + R, mean_ptr, var_ptr, c, writer, N, C, G, eps, CENTERED,
                                              BLOCK_N), mask=writer)
    tl.store(ws_ptr + C + c, _sum_over_batch(sums_ptr, c, writer, N, C, BLOCK_N), mask=writer)
    if HAS_V:
        tl.store(ws_ptr + 2 * C + c, w * _rstd_dot_over_batch(sums_ptr + 2 * R, mean_ptr, var_ptr, c, writer, N, C,
                                                               G, eps, CENTERED, BLOCK_N), mask=writer)


def sample_forward(x, weight, bias, v, groups: int, eps: float, centered: bool):
    """(y, workspace)."""
    g = _geometry(x)
    ws, y = _workspace(x, g.n * groups, SAMPLE_SUMS), torch.empty_like(x)
    with _on_device(x):
        _moments(ws, x, g.c, g.n * groups)
        _launch(_sample_forward_kernel, g.tile_grid, y, x, ws, weight, bias, weight if v is None else v, g.n, g.c,
                g.length, groups, eps, HAS_V=v is not None, CENTERED=centered, BLOCK_R=g.block_r,
                BLOCK_L=g.block_l)
    return y, ws


def sample_backward(x, grad_y, ws, weight, v, groups: int, eps: float, centered: bool):
    """(grad_x, grad_weight, grad_bias, grad_v or None); parameter gradients are views of the workspace."""
    g = _geometry(x)
    grad_x = torch.empty_like(x)
    v_or_weight = weight if v is None else v
    meta = {"HAS_V": v is not None, "BLOCK_R": g.block_r, "BLOCK_L": g.block_l}
    with _on_device(x):
        _launch(_sample_sums_kernel, g.row_grid, ws, x, grad_y, v_or_weight, g.n, g.c, g.length, groups, **meta)
        _launch(_sample_grad_x_kernel, g.tile_grid, grad_x, x, grad_y, ws, weight, v_or_weight, g.n, g.c, g.length,
                groups, eps, CENTERED=centered, BLOCK_N=g.block_n,
                BLOCK_G=_small_block(g.c // groups, g.block_r), **meta)
    return (grad_x, *_parameter_grads(ws, g.c, v))


def sample_saved_stats(ws: torch.Tensor, n: int, c: int, groups: int, eps: float, centered: bool):
    """(mean (N, groups) or None, rstd (N, groups)) from a forward's workspace: what the eager backward needs."""
    layout = workspace_layout(n, c, n * groups, SAMPLE_SUMS)
    mean, var = (ws.narrow(0, *layout[name]).view(n, groups) for name in ("mean", "var"))
    if centered:
        return mean, (var + eps).rsqrt()
    return None, (var + mean.square() + eps).rsqrt()
