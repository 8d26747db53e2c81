"""Triton kernels of the fast EvoNorms on CUDA (imported only when needed): a layer call is four launches (two or
three on small maps).

Forward: one statistics launch (mean and variance of each (n, c) row over (H, W)) and one element-wise launch that
also does the small algebra (batch variance or group statistics from the per-(n, c) moments, coefficients,
per-channel results). Backward: one launch for the per-(n, c) sums over (H, W) and one element-wise launch for the
input gradient that also reduces those sums over the batch or the group and writes the parameter gradients.

The element-wise kernels work on tiles of one row set: the rows that share a statistic, i.e. one channel across
the batch (B-series: batch variance, batch sums) or one (sample, group) (S-series: group statistics, group sums). A
program reduces its set's small per-(n, c) results once (a loop over N or over the group's channels) and applies
them to its whole tile, so no launch waits on a separate small-algebra kernel and no row repeats the reduction.
Where a whole row set fits one tile (``WHOLE_SET_TILE``: small maps), one program per set computes the set's
moments itself: the forward is one launch, and so is the B-series backward (a channel's parameter gradients are its
own set's; the S-series backward keeps its two launches, since a channel's parameter gradients sum over samples,
i.e. over sets).

Everything small lives in one float32 workspace per call, allocated by the forward and kept for the backward
(``workspace_layout``): parameter gradients | mean | variance | batch std or group statistics | backward sums. The
backward returns the parameter gradients as views of it. Per-channel results (batch std, running variance,
parameter gradients) and per-group statistics have exactly one writer program each, and no program reads what
another writes in the same launch, so results are deterministic.

x, y, grad_y and grad_x are read and written in their own dtype (float32, float16, bfloat16); all arithmetic is
float32. Inputs must be contiguous (N, C, H, W). No result goes back to the host: launches only, and only the first
launch of a kernel per argument specialisation goes through Triton's argument binding (``_launch``).
With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

try:
    from triton import knobs  # Triton >= 3.4 (torch >= 2.9): where the launch hooks live
except ImportError:  # older Triton: every launch goes through kernel[grid]
    knobs = None

log = logging.getLogger(__name__)
ROW_TILE = 1024  # elements per tile of the row reductions (moments, backward sums)
SET_TILE = 2048  # elements per tile of the element-wise kernels
WHOLE_SET_TILE = 4096  # most elements (padded to powers of two) of a row set that one program takes whole
MAX_COLS = 1024  # longest row chunk of a tile
MAX_ROWS = 128  # most rows of a tile (see _tile_shape)
REDUCE_BLOCK = 64  # members (samples, group channels) per step of the reductions over a row set
REDUCE_TILE = 4096  # (rows, samples) tile of the per-channel reductions of the S-series parameter gradients
BATCH_VARIANTS = {"b0": 0, "b1": 1, "b2": 2}
BATCH_SUMS = 5  # per (n, c): gy, gy t, q on the batch branch, q on the instance branch, q x on the instance branch
SAMPLE_SUMS = 3  # per (n, c): gy, gy num, gy num x (1 - s)


def workspace_layout(n: int, c: int, groups: int | None = None) -> dict[str, tuple[int, int]]:
    """(offset, length) of each part of the float32 workspace of the B-series (groups None) or the S-series; must
    match ``_layout`` below."""
    if groups is None:
        stats, sums = {"batch_std": c}, BATCH_SUMS
    else:
        stats, sums = {"group_mean": n * groups, "group_rstd": n * groups}, SAMPLE_SUMS
    sizes = {"grad_weight": c, "grad_bias": c, "grad_v": c, "mean": n * c, "var": n * c, **stats, "sums": sums * n * c}
    layout, offset = {}, 0
    for name, size in sizes.items():
        layout[name] = (offset, size)
        offset += size
    return layout


@triton.jit
def _layout(ws_ptr, R, C, STATS):
    """Pointers to the mean, variance, batch std or group statistics (STATS floats) and sums parts of the
    workspace (R = N*C rows)."""
    mean_ptr = ws_ptr + 3 * C
    var_ptr = mean_ptr + R
    stats_ptr = var_ptr + R
    return mean_ptr, var_ptr, stats_ptr, stats_ptr + STATS


def _pow2(n: int) -> int:
    """Smallest power of two >= n. Plain Python: ``triton.next_power_of_2`` and ``triton.cdiv`` are JIT functions that
    cost microseconds per call from the host, and a layer call's host time is what limits small maps."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_shape(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_L) of a tile of about ``tile`` elements. At most MAX_ROWS rows: a (1024, 4) tile of inline
    batch reductions summed only its first column on an H200 (Triton 3.6), while tiles of up to 128 rows were right
    (tests/test_triton_kernels.py)."""
    block_l = min(_pow2(cols), MAX_COLS)
    return min(max(tile // block_l, 1), _pow2(rows), MAX_ROWS), block_l


class _Plan(NamedTuple):
    """Sizes and launch geometry of a layer call on a contiguous (N, C, H, W) input."""
    n: int
    c: int
    length: int  # H * W
    workspace: int  # floats
    row_grid: tuple[int]  # row reductions over the N*C rows: one program per BLOCK_R rows
    block_r: int
    row_block_l: int
    grid: tuple[int]  # element-wise kernels: one program per (row set, member block, column chunk)
    block_m: int
    block_l: int
    block_n: int  # samples per step of a reduction over the batch
    block_g: int  # channels per step of a reduction over a group (S-series)
    whole_sets: bool  # a row set fits one tile: the "_set" kernels take it whole, one program per set
    set_grid: tuple[int]
    set_block_m: int
    set_block_l: int
    set_warps: int  # 8 elements per thread, at least 4 warps: the B-series backward then needs <= 128 registers


@functools.lru_cache(maxsize=1024)
def _plan(shape: torch.Size, groups: int | None) -> _Plan:
    """The plan of a B-series (groups None) or S-series call; cached per shape, since a call's host time is what
    limits small maps."""
    n, c = shape[:2]
    length = math.prod(shape[2:])
    sets, members = (c, n) if groups is None else (n * groups, c // groups)
    block_r, row_block_l = _tile_shape(n * c, length, ROW_TILE)
    block_m, block_l = _tile_shape(members, length, SET_TILE)
    set_block_m, set_block_l = _pow2(members), _pow2(length)
    whole_sets = set_block_m <= MAX_ROWS and set_block_l <= MAX_COLS and set_block_m * set_block_l <= WHOLE_SET_TILE
    return _Plan(n, c, length, sum(size for _, size in workspace_layout(n, c, groups).values()),
                 (_cdiv(n * c, block_r),), block_r, row_block_l,
                 (sets * _cdiv(members, block_m) * _cdiv(length, block_l),), block_m, block_l,
                 _reduce_block(n, 1 if groups is None else block_m), _reduce_block(members),
                 whole_sets, (sets,), set_block_m, set_block_l, max(4, min(16, set_block_m * set_block_l // 256)))


def _reduce_block(count: int, width: int = 1) -> int:
    """Members per step of a reduction over ``count`` members, for ``width`` values at once."""
    return max(1, min(_pow2(count), REDUCE_BLOCK, REDUCE_TILE // width))


def _parameter_grads(ws: torch.Tensor, c: int, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_weight, grad_bias, grad_v or None): the head of the workspace, as the grad_x kernels wrote it."""
    grad_weight, grad_bias, grad_v, _ = ws.split_with_sizes([c, c, c, ws.numel() - 3 * c])  # Tensor.split: slower
    return grad_weight, grad_bias, None if v is None else grad_v


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (a context only where it is another)."""
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# Compiled kernels by launch key (see _launch); emptied when it grows past COMPILED_KEYS (shapes of many sizes)
_compiled: dict[tuple, tuple[CompiledKernel, list[str]]] = {}
COMPILED_KEYS = 4096
DIRECT_LAUNCH = knobs is not None  # False: every launch through kernel[grid] (benchmarks compare the two)
# A list: _launch appends each launch's (compiled kernel, grid, arguments), or None where it cannot tell them
# (evonorm.triton_native records a call's launches so)
RECORDED: list | None = None


def _spec(arg):
    """What Triton specialises an argument on (a tensor: dtype and 16-byte alignment), or finer (a scalar: its
    value)."""
    return (arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor) else arg


def _launch(kernel, grid: tuple[int], *args, **meta) -> None:
    """Every kernel launch of this module (tests count launches here), on a 1D grid.

    ``kernel[grid](...)`` binds and specialises every argument on each launch: most of a launch's host time, and a
    layer call's host time is what limits small maps on a GPU. So it runs once per launch key (it compiles the
    kernel the first time); later launches with the key call the compiled kernel directly, with the arguments and
    hooks Triton passes it (tests/test_triton_kernels.py compares the two). The key holds everything Triton
    specialises on, or finer: the kernel, grid, device, constexprs, ``_spec`` of each argument and Triton's debug
    and instrumentation settings. A Triton whose compiled kernels take other arguments makes the first direct
    launch raise before launching: then every launch goes through ``kernel[grid]``, with a warning.
    """
    global DIRECT_LAUNCH
    if not (DIRECT_LAUNCH and isinstance(kernel, JITFunction)):  # the interpreter runs its own functions
        compiled = kernel[grid](*args, **meta)
        if RECORDED is not None:
            RECORDED.append((compiled, grid, args) if _binds_in_order(kernel, compiled, args, meta) else None)
        return
    device = driver.active.get_current_device()
    key = (id(kernel), grid, device, knobs.runtime.debug, getattr(knobs.compilation, "instrumentation_mode", None),
           *meta.values(), *map(_spec, args))
    hit = _compiled.get(key)
    if hit is not None:
        compiled, constexpr_names = hit
        params = (*args, *[meta[name] for name in constexpr_names])  # all parameters in order, as Triton binds them
        try:
            stream = driver.active.get_current_stream(device)
            compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid, stream, *params), knobs.runtime.launch_enter_hook,
                         knobs.runtime.launch_exit_hook, *params)
            if RECORDED is not None:
                RECORDED.append((compiled, grid, args))
            return
        except (TypeError, AttributeError) as err:
            log.warning("evonorm: direct Triton launches failed, launching through kernel[grid] from now on "
                        "(%s: %s)", type(err).__name__, err)
            DIRECT_LAUNCH = False
    compiled = kernel[grid](*args, **meta)
    binds = _binds_in_order(kernel, compiled, args, meta)
    if binds:
        if len(_compiled) >= COMPILED_KEYS:
            _compiled.clear()
        _compiled[key] = compiled, kernel.arg_names[len(args):]  # the rest of meta: launch options (num_warps)
    if RECORDED is not None:
        RECORDED.append((compiled, grid, args) if binds else None)


def _binds_in_order(kernel, compiled, args: tuple, meta: dict) -> bool:
    """Whether a compiled kernel's parameters are ``args`` and then ``meta``'s constexprs, in order (meta holding
    nothing else but launch options)."""
    constexpr_names = kernel.arg_names[len(args):] if isinstance(kernel, JITFunction) else None
    return (isinstance(compiled, CompiledKernel) and constexpr_names is not None
            and set(constexpr_names) <= set(meta) <= {*constexpr_names, "num_warps"})


@triton.jit
def _chunk(rows, ok, start, L, BLOCK_L: tl.constexpr):
    """(element offsets, mask) of columns [start, start + BLOCK_L) of the given rows (valid where ok); int64
    offsets: R * L may not fit 32 bits."""
    cols = start + tl.arange(0, BLOCK_L)
    return rows.to(tl.int64)[:, None] * L + cols[None, :], ok[:, None] & (cols < L)[None, :]


@triton.jit
def _set_tile(SET_STRIDE, MEMBER_STRIDE, MEMBERS, L, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's tile of a row set: set s holds rows s * SET_STRIDE + m * MEMBER_STRIDE, m < MEMBERS.
    Returns (s, m, rows, valid rows, element offsets, mask, first: the tile holds the set's first member block and
    first column chunk, first_chunk: its first column chunk). The grid is 1D over tiles: a 2D grid's second axis
    stops at 65535 blocks."""
    col_blocks = tl.cdiv(L, BLOCK_L)
    member_blocks = tl.cdiv(MEMBERS, BLOCK_M)
    pid = tl.program_id(0)
    col_block = pid % col_blocks
    member_block = (pid // col_blocks) % member_blocks
    s = pid // (col_blocks * member_blocks)
    m = member_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = m < MEMBERS
    rows = s * SET_STRIDE + m * MEMBER_STRIDE
    offs, mask = _chunk(rows, ok, col_block * BLOCK_L, L, BLOCK_L)
    return s, m, rows, ok, offs, mask, (member_block == 0) & (col_block == 0), col_block == 0


@triton.jit
def _load(ptr, idx, mask):
    return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _param(ptr, c):
    """A float32 per-channel parameter at channel(s) c (always in range)."""
    return tl.load(ptr + c).to(tl.float32)


@triton.jit
def _sum_strided(ptr, start, stride, count, BLOCK: tl.constexpr):
    """sum over j < count of ptr[start + j * stride] (a scalar)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for j0 in range(0, count, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        acc += _load(ptr, start + j * stride, j < count)
    return tl.sum(acc, axis=0)


@triton.jit
def _moments_kernel(ws_ptr, x_ptr, R, L, C, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Mean and biased variance of each of the R = N*C rows of length L into the workspace: exact two-pass moments
    of each chunk, merged across chunks (Chan et al.), so a large mean against a small spread loses nothing."""
    mean_ptr, var_ptr, _, _ = _layout(ws_ptr, R, C, 0)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    mean = tl.zeros((BLOCK_R,), tl.float32)
    m2 = tl.zeros((BLOCK_R,), tl.float32)
    count = 0.0
    for start in range(0, L, BLOCK_L):
        offs, mask = _chunk(rows, ok, start, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.minimum(L - start, BLOCK_L).to(tl.float32)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_b / total)
        count = total
    tl.store(mean_ptr + rows, mean, mask=ok)
    tl.store(var_ptr + rows, m2 / L, mask=ok)


def _moments(ws: torch.Tensor, x: torch.Tensor, p: _Plan) -> None:
    """Mean and variance of each (n, c) row of x over (H, W)."""
    _launch(_moments_kernel, p.row_grid, ws, x, p.n * p.c, p.length, p.c, BLOCK_R=p.block_r, BLOCK_L=p.row_block_l)


def _forward(set_kernel, tiled_kernel, p: _Plan, ws: torch.Tensor, x: torch.Tensor, args: tuple, meta: dict,
             **tiled_meta) -> None:
    """A forward's launches: one program per row set where a set fits one tile, else the moments of each (n, c)
    row and then tiles of each set."""
    with _on_device(x):
        if p.whole_sets:
            _launch(set_kernel, p.set_grid, *args, **meta, BLOCK_M=p.set_block_m, BLOCK_L=p.set_block_l,
                    num_warps=p.set_warps)
        else:
            _moments(ws, x, p)
            _launch(tiled_kernel, p.grid, *args, **meta, BLOCK_M=p.block_m, BLOCK_L=p.block_l, **tiled_meta)


# ---------------------------------------------------------------------------------------------------------------
# B-series: y = x / r * scale + bias, r = max(a x + b, 1), a = alpha / batch_std, b = beta / batch_std,
# scale = weight / batch_std, instance term alpha x + beta (see evonorm.fused for the derivation). Row set: one
# channel c across the batch (rows n * C + c).


@triton.jit
def _batch_variance(mean_ptr, var_ptr, c, N, C, BLOCK_N: tl.constexpr):
    """Variance over (N, H, W) of channel c from the per-(n, c) moments: mean of the variances + variance of the
    means."""
    batch_mean = _sum_strided(mean_ptr, c, C, N, BLOCK_N) / N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = n < N
        d = tl.where(m, _load(mean_ptr, n * C + c, m) - batch_mean, 0.0)
        acc += _load(var_ptr, n * C + c, m) + d * d
    return tl.sum(acc, axis=0) / N


@triton.jit
def _instance_coefficients(mean, var, v_ptr, c, eps, VARIANT: tl.constexpr):
    """alpha, beta with instance term = alpha x + beta, per row, from the rows' moments (c: their channel(s))."""
    if VARIANT == 0:  # b0: v x + sqrt(var_{H,W} + eps)
        beta = tl.sqrt(var + eps)
        alpha = tl.zeros_like(beta) + _param(v_ptr, c)
    else:
        beta = tl.sqrt(var + mean * mean + eps)  # rms = sqrt(mean_{H,W}(x^2) + eps)
        if VARIANT == 1:  # b1: (x + 1) rms
            alpha = beta
        else:  # b2: rms - x
            alpha = tl.full(beta.shape, -1.0, tl.float32)
    return alpha, beta


@triton.jit
def _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT: tl.constexpr):
    """Per row: mean, alpha, beta, from the moments in the workspace."""
    mean = _load(mean_ptr, rows, ok)
    alpha, beta = _instance_coefficients(mean, _load(var_ptr, rows, ok), v_ptr, c, eps, VARIANT)
    return mean, alpha, beta


@triton.jit
def _batch_r(x, a, b):
    return tl.maximum(a[:, None] * x + b[:, None], 1.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN


@triton.jit
def _store_channel_stats(bstd_ptr, rv_ptr, c, batch_var, bstd, momentum, TRAINING: tl.constexpr):
    """Channel c's batch std, for the backward; in training the running variance moves towards batch_var where it
    is finite (torch.lerp's formula). Called by one program per channel."""
    tl.store(bstd_ptr + c, bstd)
    if TRAINING:
        rv = _param(rv_ptr, c)
        new = tl.where(momentum < 0.5, rv + momentum * (batch_var - rv),
                       batch_var - (batch_var - rv) * (1.0 - momentum))
        new = tl.where(batch_var - batch_var == 0.0, new, rv)
        tl.store(rv_ptr + c, new.to(rv_ptr.dtype.element_ty))


@triton.jit
def _batch_output(x, alpha, beta, bstd, w_ptr, bias_ptr, c):
    return x / _batch_r(x, alpha / bstd, beta / bstd) * (_param(w_ptr, c) / bstd) + _param(bias_ptr, c)


@triton.jit
def _batch_forward_kernel(y_ptr, x_ptr, ws_ptr, w_ptr, bias_ptr, v_ptr, rv_ptr, N, C, L, eps, momentum,
                          VARIANT: tl.constexpr, TRAINING: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    c, _, rows, ok, offs, mask, first, _ = _set_tile(1, C, N, L, BLOCK_M, BLOCK_L)
    mean_ptr, var_ptr, bstd_ptr, _ = _layout(ws_ptr, N * C, C, C)
    if TRAINING:
        batch_var = _batch_variance(mean_ptr, var_ptr, c, N, C, BLOCK_N)
    else:
        batch_var = _param(rv_ptr, c)
    bstd = tl.sqrt(batch_var + eps)
    if first:
        _store_channel_stats(bstd_ptr, rv_ptr, c, batch_var, bstd, momentum, TRAINING)
    mean, alpha, beta = _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = _batch_output(x, alpha, beta, bstd, w_ptr, bias_ptr, c)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_forward_set_kernel(y_ptr, x_ptr, ws_ptr, w_ptr, bias_ptr, v_ptr, rv_ptr, N, C, L, eps, momentum,
                              VARIANT: tl.constexpr, TRAINING: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """The whole forward of one channel whose N x L elements fit one tile: moments (exact two-pass), batch
    variance, output."""
    c, _, rows, ok, offs, mask, _, _ = _set_tile(1, C, N, L, BLOCK_M, BLOCK_L)
    mean_ptr, var_ptr, bstd_ptr, _ = _layout(ws_ptr, N * C, C, C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / L
    d = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / L
    tl.store(mean_ptr + rows, mean, mask=ok)  # for the backward
    tl.store(var_ptr + rows, var, mask=ok)
    if TRAINING:  # mean of the variances + variance of the means
        batch_mean = tl.sum(mean, axis=0) / N  # rows past N hold zeros
        d_mean = tl.where(ok, mean - batch_mean, 0.0)
        batch_var = tl.sum(var + d_mean * d_mean, axis=0) / N
    else:
        batch_var = _param(rv_ptr, c)
    bstd = tl.sqrt(batch_var + eps)
    _store_channel_stats(bstd_ptr, rv_ptr, c, batch_var, bstd, momentum, TRAINING)
    alpha, beta = _instance_coefficients(mean, var, v_ptr, c, eps, VARIANT)
    y = _batch_output(x, alpha, beta, bstd, w_ptr, bias_ptr, c)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_terms(x, gy, a, b):
    """Per element: gy, gy t, q on the batch branch, q_inst, q_inst x, and 1 / r and the instance branch
    (t = x / r, q = gy t / r)."""
    r = _batch_r(x, a, b)
    inv_r = 1.0 / r  # one division per element, not two
    t = x * inv_r
    q = gy * t * inv_r
    inst = r > 1.0
    q_inst = tl.where(inst, q, 0.0)
    return gy * t, tl.where(inst, 0.0, q), q_inst, q_inst * x, inv_r


@triton.jit
def _batch_sums_kernel(ws_ptr, x_ptr, gy_ptr, v_ptr, N, C, L, eps, VARIANT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per-(n, c) sums over (H, W) of gy, gy t, q_batch, q_inst, q_inst x (t = x / r, q = gy t / r split by the
    branch of max())."""
    R = N * C
    mean_ptr, var_ptr, bstd_ptr, sums_ptr = _layout(ws_ptr, R, C, C)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    c = rows % C
    _, alpha, beta = _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT)
    bstd = _param(bstd_ptr, c)
    a, b = alpha / bstd, beta / bstd
    acc_gy = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_gy_t = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_batch = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_inst = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    acc_q_inst_x = tl.zeros((BLOCK_R, BLOCK_L), tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, mask = _chunk(rows, ok, start, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 past the end: adds nothing
        # not "_", which holds a vector before the loop: Triton keeps a loop-assigned name's type
        gy_t, q_batch, q_inst, q_inst_x, _inv_r = _batch_terms(x, gy, a, b)
        acc_gy += gy
        acc_gy_t += gy_t
        acc_q_batch += q_batch
        acc_q_inst += q_inst
        acc_q_inst_x += q_inst_x
    tl.store(sums_ptr + rows, tl.sum(acc_gy, axis=1), mask=ok)
    tl.store(sums_ptr + R + rows, tl.sum(acc_gy_t, axis=1), mask=ok)
    tl.store(sums_ptr + 2 * R + rows, tl.sum(acc_q_batch, axis=1), mask=ok)
    tl.store(sums_ptr + 3 * R + rows, tl.sum(acc_q_inst, axis=1), mask=ok)
    tl.store(sums_ptr + 4 * R + rows, tl.sum(acc_q_inst_x, axis=1), mask=ok)


@triton.jit
def _batch_stat_coefficients(mean, beta, q_inst, q_inst_x, q_batch_total, batch_mean, w_ss, bstd, N, L,
                             VARIANT: tl.constexpr, TRAINING: tl.constexpr):
    """Per row: k1, k0 of the input gradient's terms through the statistics, k1 (x - mean) + k0, from the row's
    sums of q_inst (and q_inst x, b1) and the channel's total of q_batch and batch mean (training)."""
    g_beta = -w_ss * q_inst  # dL/d den = -w_ss q, summed over the instance branch
    if VARIANT == 0:  # beta = sqrt(var + eps): d beta / dx = (x - mean) / (L beta)
        k1 = g_beta / (beta * L)
        k0 = tl.zeros_like(k1)
    else:  # beta = rms: d rms / dx = x / (L rms) = ((x - mean) + mean) / (L rms); b1 also has alpha = rms
        if VARIANT == 1:
            g_beta += -w_ss * q_inst_x
        k1 = g_beta / (beta * L)
        k0 = k1 * mean
    if TRAINING:  # d batch_std / dx = (x - batch_mean) / (N L batch_std)
        k_batch = -w_ss * q_batch_total / (bstd * N * L)
        k1 += k_batch
        k0 += k_batch * (mean - batch_mean)
    return k1, k0


@triton.jit
def _batch_grad_x(x, gy, mean, a, inv_r, q_inst, scale, k1, k0):
    """grad_x = (gy / r - a q_inst) scale + k1 (x - mean) + k0."""
    return (gy * inv_r - a[:, None] * q_inst) * scale + k1[:, None] * (x - mean[:, None]) + k0[:, None]


@triton.jit
def _batch_parameter_grads(ws_ptr, C, c, gy_t, gy, q_inst_x, bstd, w_ss, VARIANT: tl.constexpr):
    """Channel c's weight, bias (and v, b0) gradients from its totals over (N, H, W)."""
    tl.store(ws_ptr + c, gy_t / bstd)
    tl.store(ws_ptr + C + c, gy)
    if VARIANT == 0:
        tl.store(ws_ptr + 2 * C + c, -w_ss * q_inst_x)


@triton.jit
def _batch_grad_x_kernel(gx_ptr, x_ptr, gy_ptr, ws_ptr, w_ptr, v_ptr, N, C, L, eps,
                         VARIANT: tl.constexpr, TRAINING: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    """The input gradient from the per-(n, c) sums, and (first tile of each channel) the parameter gradients."""
    R = N * C
    c, _, rows, ok, offs, mask, first, _ = _set_tile(1, C, N, L, BLOCK_M, BLOCK_L)
    mean_ptr, var_ptr, bstd_ptr, sums_ptr = _layout(ws_ptr, R, C, C)
    mean, alpha, beta = _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT)
    bstd = _param(bstd_ptr, c)
    w = _param(w_ptr, c)
    w_ss = w / (bstd * bstd)
    q_inst_x = _load(sums_ptr + 4 * R, rows, ok) if VARIANT == 1 else 0.0
    q_batch_total = _sum_strided(sums_ptr + 2 * R, c, C, N, BLOCK_N) if TRAINING else 0.0
    batch_mean = _sum_strided(mean_ptr, c, C, N, BLOCK_N) / N if TRAINING else 0.0
    k1, k0 = _batch_stat_coefficients(mean, beta, _load(sums_ptr + 3 * R, rows, ok), q_inst_x, q_batch_total,
                                      batch_mean, w_ss, bstd, N, L, VARIANT, TRAINING)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    a = alpha / bstd
    _, _, q_inst, _, inv_r = _batch_terms(x, gy, a, beta / bstd)
    gx = _batch_grad_x(x, gy, mean, a, inv_r, q_inst, w / bstd, k1, k0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if first:
        q_inst_x_total = _sum_strided(sums_ptr + 4 * R, c, C, N, BLOCK_N) if VARIANT == 0 else 0.0
        _batch_parameter_grads(ws_ptr, C, c, _sum_strided(sums_ptr + R, c, C, N, BLOCK_N),
                               _sum_strided(sums_ptr, c, C, N, BLOCK_N), q_inst_x_total, bstd, w_ss, VARIANT)


@triton.jit
def _batch_backward_set_kernel(gx_ptr, x_ptr, gy_ptr, ws_ptr, w_ptr, v_ptr, N, C, L, eps,
                               VARIANT: tl.constexpr, TRAINING: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """The whole backward of one channel whose N x L elements fit one tile: per-(n, c) sums, their totals over the
    batch, the input gradient and the parameter gradients."""
    c, _, rows, ok, offs, mask, _, _ = _set_tile(1, C, N, L, BLOCK_M, BLOCK_L)
    mean_ptr, var_ptr, bstd_ptr, _ = _layout(ws_ptr, N * C, C, C)
    mean, alpha, beta = _instance_term(mean_ptr, var_ptr, v_ptr, rows, c, ok, eps, VARIANT)
    bstd = _param(bstd_ptr, c)
    w = _param(w_ptr, c)
    w_ss = w / (bstd * bstd)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 outside the set: adds nothing
    a = alpha / bstd
    gy_t, q_batch, q_inst, q_inst_x, inv_r = _batch_terms(x, gy, a, beta / bstd)
    row_q_inst_x = tl.sum(q_inst_x, axis=1)
    q_batch_total = tl.sum(tl.sum(q_batch, axis=1), axis=0)
    k1, k0 = _batch_stat_coefficients(mean, beta, tl.sum(q_inst, axis=1), row_q_inst_x, q_batch_total,
                                      tl.sum(mean, axis=0) / N, w_ss, bstd, N, L, VARIANT, TRAINING)
    gx = _batch_grad_x(x, gy, mean, a, inv_r, q_inst, w / bstd, k1, k0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    _batch_parameter_grads(ws_ptr, C, c, tl.sum(tl.sum(gy_t, axis=1), axis=0), tl.sum(tl.sum(gy, axis=1), axis=0),
                           tl.sum(row_q_inst_x, axis=0), bstd, w_ss, VARIANT)


def batch_forward(x, weight, bias, v, running_var, variant: str, eps: float, momentum: float, training: bool):
    """(y, workspace); in training the running variance is updated in place."""
    p = _plan(x.shape, None)
    ws, y = x.new_empty(p.workspace, dtype=torch.float32), torch.empty_like(x)
    args = y, x, ws, weight, bias, weight if v is None else v, running_var, p.n, p.c, p.length, eps, momentum
    _forward(_batch_forward_set_kernel, _batch_forward_kernel, p, ws, x, args,
             {"VARIANT": BATCH_VARIANTS[variant], "TRAINING": training}, BLOCK_N=p.block_n)
    return y, ws


def batch_backward(x, grad_y, ws, weight, v, variant: str, eps: float, training: bool):
    """(grad_x, grad_weight, grad_bias, grad_v or None); parameter gradients are views of the workspace."""
    p = _plan(x.shape, None)
    grad_x = torch.empty_like(x)
    v_or_weight = weight if v is None else v
    args = grad_x, x, grad_y, ws, weight, v_or_weight, p.n, p.c, p.length, eps
    meta = {"VARIANT": BATCH_VARIANTS[variant], "TRAINING": training}
    with _on_device(x):
        if p.whole_sets:
            _launch(_batch_backward_set_kernel, p.set_grid, *args, **meta, BLOCK_M=p.set_block_m,
                    BLOCK_L=p.set_block_l, num_warps=p.set_warps)
        else:
            _launch(_batch_sums_kernel, p.row_grid, ws, x, grad_y, v_or_weight, p.n, p.c, p.length, eps,
                    VARIANT=meta["VARIANT"], BLOCK_R=p.block_r, BLOCK_L=p.row_block_l)
            _launch(_batch_grad_x_kernel, p.grid, *args, **meta, BLOCK_M=p.block_m, BLOCK_L=p.block_l,
                    BLOCK_N=p.block_n)
    return (grad_x, *_parameter_grads(ws, p.c, v))


def batch_saved_stats(ws: torch.Tensor, n: int, c: int):
    """(mean (N, C), var (N, C), batch std (C,)) from a forward's workspace: what the eager backward needs."""
    layout = workspace_layout(n, c)
    mean, var, bstd = (ws.narrow(0, *layout[name]) for name in ("mean", "var", "batch_std"))
    return mean.view(n, c), var.view(n, c), bstd


# ---------------------------------------------------------------------------------------------------------------
# S-series: y = x sigmoid(v x) rstd weight + bias per (n, group) rstd; v = 1 without HAS_V. Row set: the channels
# of one (sample, group), rows (n G + g) CPG + k; the forward stores each set's mean and rstd for the backward.


@triton.jit
def _group_rstd(mean_ptr, var_ptr, base, center, CPG, eps, CENTERED: tl.constexpr, BLOCK_G: tl.constexpr):
    """1 / sqrt(var + eps) (CENTERED, center = the group mean) or 1 / sqrt(mean(x^2) + eps) of the group whose
    per-channel moments start at row ``base``: mean over its channels of var_c + (mean_c - center)^2."""
    acc = tl.zeros((BLOCK_G,), tl.float32)
    for j0 in range(0, CPG, BLOCK_G):
        j = j0 + tl.arange(0, BLOCK_G)
        m = j < CPG
        d = tl.where(m, _load(mean_ptr, base + j, m) - center, 0.0) if CENTERED else _load(mean_ptr, base + j, m)
        acc += _load(var_ptr, base + j, m) + d * d
    return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / CPG + eps)


@triton.jit
def _sample_output(x, rstd, w_ptr, bias_ptr, v_ptr, c, ok, HAS_V: tl.constexpr):
    """x sigmoid(v x) rstd weight + bias for rows of channels c (valid where ok)."""
    z = _load(v_ptr, c, ok)[:, None] * x if HAS_V else x
    return x * tl.sigmoid(z) * (rstd * _load(w_ptr, c, ok))[:, None] + _load(bias_ptr, c, ok)[:, None]


@triton.jit
def _sample_forward_kernel(y_ptr, x_ptr, ws_ptr, w_ptr, bias_ptr, v_ptr, N, C, L, G, eps,
                           HAS_V: tl.constexpr, CENTERED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr):
    CPG = C // G
    grp, k, rows, ok, offs, mask, first, _ = _set_tile(CPG, 1, CPG, L, BLOCK_M, BLOCK_L)
    mean_ptr, var_ptr, gstat_ptr, _ = _layout(ws_ptr, N * C, C, 2 * N * G)
    base = grp * CPG
    center = _sum_strided(mean_ptr, base, 1, CPG, BLOCK_G) / CPG if CENTERED else 0.0
    rstd = _group_rstd(mean_ptr, var_ptr, base, center, CPG, eps, CENTERED, BLOCK_G)
    if first:  # read by the backward only
        tl.store(gstat_ptr + N * G + grp, rstd)
        if CENTERED:
            tl.store(gstat_ptr + grp, center)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = _sample_output(x, rstd, w_ptr, bias_ptr, v_ptr, (grp % G) * CPG + k, ok, HAS_V)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sample_forward_set_kernel(y_ptr, x_ptr, ws_ptr, w_ptr, bias_ptr, v_ptr, N, C, L, G, eps,
                               HAS_V: tl.constexpr, CENTERED: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """The whole forward of one (sample, group) whose C/G x L elements fit one tile: group statistics (exact
    two-pass), stored for the backward, and the output."""
    CPG = C // G
    grp, k, _, ok, offs, mask, _, _ = _set_tile(CPG, 1, CPG, L, BLOCK_M, BLOCK_L)
    _, _, gstat_ptr, _ = _layout(ws_ptr, N * C, C, 2 * N * G)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    size = CPG * L
    if CENTERED:
        center = tl.sum(tl.sum(x, axis=1), axis=0) / size
        tl.store(gstat_ptr + grp, center)
        d = tl.where(mask, x - center, 0.0)
    else:  # second moment
        d = x
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / size + eps)
    tl.store(gstat_ptr + N * G + grp, rstd)
    y = _sample_output(x, rstd, w_ptr, bias_ptr, v_ptr, (grp % G) * CPG + k, ok, HAS_V)
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
        offs, mask = _chunk(rows, ok, start, L, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(v * x)
        gy_num = gy * x * s
        acc_gy += gy
        acc_gy_num += gy_num
        acc_v += gy_num * x * (1 - s)
    _, _, _, sums_ptr = _layout(ws_ptr, R, C, 2 * N * G)
    tl.store(sums_ptr + rows, tl.sum(acc_gy, axis=1), mask=ok)
    tl.store(sums_ptr + R + rows, tl.sum(acc_gy_num, axis=1), mask=ok)
    tl.store(sums_ptr + 2 * R + rows, tl.sum(acc_v, axis=1), mask=ok)


@triton.jit
def _sample_grad_x_kernel(gx_ptr, x_ptr, gy_ptr, ws_ptr, w_ptr, v_ptr, N, C, L, G,
                          HAS_V: tl.constexpr, CENTERED: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """grad_x = gy d num / dx scale + k1 (x - center), k1 = -g_rstd rstd^3 / (L C/G) with g_rstd the group's sum of
    weight gy num; and (the tiles of sample 0 holding a first column chunk) the parameter gradients."""
    R = N * C
    CPG = C // G
    grp, k, rows, ok, offs, mask, _, first_chunk = _set_tile(CPG, 1, CPG, L, BLOCK_M, BLOCK_L)
    _, _, gstat_ptr, sums_ptr = _layout(ws_ptr, R, C, 2 * N * G)
    g = grp % G
    c = g * CPG + k
    rstd = _param(gstat_ptr + N * G, grp)
    w = _load(w_ptr, c, ok)
    acc = tl.zeros((BLOCK_G,), tl.float32)
    for j0 in range(0, CPG, BLOCK_G):
        j = j0 + tl.arange(0, BLOCK_G)
        m = j < CPG
        acc += _load(w_ptr, g * CPG + j, m) * _load(sums_ptr + R, grp * CPG + j, m)
    k1 = -tl.sum(acc, axis=0) * rstd * rstd * rstd / (CPG * L)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask).to(tl.float32)
    v = _load(v_ptr, c, ok)[:, None] if HAS_V else 1.0
    z = v * x
    s = tl.sigmoid(z)
    centered_x = x - _param(gstat_ptr, grp) if CENTERED else x
    gx = gy * (s + z * s * (1 - s)) * (rstd * w)[:, None] + k1 * centered_x
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if first_chunk & (grp < G):  # per channel: sums over the batch, weighted by each sample's rstd
        grad_w = tl.zeros((BLOCK_M,), tl.float32)
        grad_b = tl.zeros((BLOCK_M,), tl.float32)
        grad_v = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < N
            m = ok[:, None] & nm[None, :]
            idx = n[None, :] * C + c[:, None]
            rstd_n = _load(gstat_ptr + N * G, n * G + g, nm)[None, :]
            grad_w += tl.sum(_load(sums_ptr + R, idx, m) * rstd_n, axis=1)
            grad_b += tl.sum(_load(sums_ptr, idx, m), axis=1)
            if HAS_V:
                grad_v += tl.sum(_load(sums_ptr + 2 * R, idx, m) * rstd_n, axis=1)
        tl.store(ws_ptr + c, grad_w, mask=ok)
        tl.store(ws_ptr + C + c, grad_b, mask=ok)
        if HAS_V:
            tl.store(ws_ptr + 2 * C + c, w * grad_v, mask=ok)


def sample_forward(x, weight, bias, v, groups: int, eps: float, centered: bool):
    """(y, workspace)."""
    p = _plan(x.shape, groups)
    ws, y = x.new_empty(p.workspace, dtype=torch.float32), torch.empty_like(x)
    args = y, x, ws, weight, bias, weight if v is None else v, p.n, p.c, p.length, groups, eps
    _forward(_sample_forward_set_kernel, _sample_forward_kernel, p, ws, x, args,
             {"HAS_V": v is not None, "CENTERED": centered}, BLOCK_G=p.block_g)
    return y, ws


def sample_backward(x, grad_y, ws, weight, v, groups: int, centered: bool):
    """(grad_x, grad_weight, grad_bias, grad_v or None); parameter gradients are views of the workspace."""
    p = _plan(x.shape, groups)
    grad_x = torch.empty_like(x)
    v_or_weight = weight if v is None else v
    with _on_device(x):
        _launch(_sample_sums_kernel, p.row_grid, ws, x, grad_y, v_or_weight, p.n, p.c, p.length, groups,
                HAS_V=v is not None, BLOCK_R=p.block_r, BLOCK_L=p.row_block_l)
        _launch(_sample_grad_x_kernel, p.grid, grad_x, x, grad_y, ws, weight, v_or_weight, p.n, p.c, p.length,
                groups, HAS_V=v is not None, CENTERED=centered, BLOCK_M=p.block_m, BLOCK_L=p.block_l,
                BLOCK_G=p.block_g, BLOCK_N=p.block_n)
    return (grad_x, *_parameter_grads(ws, p.c, v))


def sample_saved_stats(ws: torch.Tensor, n: int, c: int, groups: int, centered: bool):
    """(mean (N, groups) or None, rstd (N, groups)) from a forward's workspace: what the eager backward needs."""
    layout = workspace_layout(n, c, groups)
    mean, rstd = (ws.narrow(0, *layout[name]).view(n, groups) for name in ("group_mean", "group_rstd"))
    return mean if centered else None, rstd
