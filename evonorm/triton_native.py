"""Native launches of the fast EvoNorms' Triton kernels (``triton_native.cpp``), chosen by ``EVONORM_TRITON_LAUNCH``.

``auto`` (default): native for CUDA tensors (CPU tensors take the Triton path only in tests: under Triton's
interpreter, or over a stand-in driver, where ``native`` asks for them). ``native``: from the second call of a key on (shapes, dtypes, alignments, options) the
whole call is a C++ autograd function that launches the kernels Triton compiled for the first call, with that
call's grid, block, shared memory and scalars: no Python between the launches and none in backward (on an H200 a
call costs the host 0.7x BN-ReLU's time this way, 1.4-1.6x from Python). ``python``: a CUDA layer call is a Python
autograd function whose kernels launch from Python (``evonorm.triton_kernels``). The first call
of a key takes the Python path and records its launches (``recorded``); ``add_forward`` / ``add_backward`` hand them
to the C++ side, which checks each kernel's declared parameters against them before it accepts a program.

The extension is built on first use (``torch.utils.cpp_extension``, some 30 s once per machine; it compiles against
the ``cuda.h`` that Triton ships and opens the driver at run time, as Triton's launcher does, where
``TRITON_LIBCUDA_PATH`` says or by the loader's search). A failed build or driver, or a launch error in a forward,
warns once and leaves the Python path. Native launches skip Triton's launch hooks (``knobs.runtime``): profilers
that hook Triton's launches see only the first call of a key.
"""
from __future__ import annotations

import logging
import os
from functools import cache

import torch

from .common import check_choice
from .cpu_kernels import cpp_extension

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(__file__), "triton_native.cpp")
LAUNCH_MODES = ("auto", "native", "python")
BATCH, SAMPLE = 0, 1  # the kinds of layer call (evonorm.fused: EvoNormBatchFn, EvoNormSampleFn)
_state: dict = {"mode": os.environ.get("EVONORM_TRITON_LAUNCH", "auto"), "failed": False}


def set_launch(mode: str) -> None:
    """Choose how the Triton kernels of a CUDA layer call are launched (``LAUNCH_MODES``)."""
    _state["mode"] = check_choice(mode, LAUNCH_MODES, "Triton launch mode")


def enabled(x: torch.Tensor) -> bool:
    """Whether the kernels of a layer call on ``x`` launch natively."""
    mode = check_choice(_state["mode"], LAUNCH_MODES, "EVONORM_TRITON_LAUNCH")
    return not _state["failed"] and (mode == "native" or (mode == "auto" and x.is_cuda))


def driver_path() -> str:
    """The CUDA driver library, where Triton looks for it (``TRITON_LIBCUDA_PATH``) or by the loader's search."""
    from triton import knobs

    folder = knobs.nvidia.libcuda_path
    return os.path.join(folder, "libcuda.so.1") if folder else "libcuda.so.1"


@cache
def module():
    """The extension, built, loaded and bound to the CUDA driver on the first call."""
    import triton.backends.nvidia as nvidia

    log.info("evonorm: building the native Triton launches (once per machine, some 30 s)")
    ext = cpp_extension().load(name="evonorm_triton_native", sources=[SOURCE], extra_cflags=["-O2"],
                               extra_include_paths=[os.path.join(os.path.dirname(nvidia.__file__), "include")])
    ext.open_driver(driver_path())
    return ext


def _fail(err: Exception) -> None:
    log.warning("evonorm: native Triton launches failed, launching from Python from now on (%s: %s)",
                type(err).__name__, err)
    _state["failed"] = True


def call(kind: int, x, weight, bias, v, running_var, option: int, eps: float, momentum: float, flag: bool):
    """The layer's output through the key's recorded program; None where there is none yet (or native failed)."""
    try:
        return module().call(kind, x, weight, bias, v, running_var, option, eps, momentum, flag)
    except Exception as err:  # no compiler, no driver, a launch error
        _fail(err)
        return None


def recorded(run, stage: str, x: torch.Tensor, *args):
    """(run(stage, x, *args), the launches of evonorm.triton_kernels it made: a list, or None when native launches
    are off for ``x``). A function, not a context manager: this is on every Python-path call, and a context manager
    costs microseconds."""
    if not enabled(x):
        return run(stage, x, *args), None
    from . import triton_kernels

    triton_kernels.RECORDED = launches = []
    try:
        return run(stage, x, *args), launches
    finally:
        triton_kernels.RECORDED = None


def _program(launches: list, slots: dict[str, torch.Tensor | None]) -> list | None:
    """The recorded launches as the C++ side takes them, with each tensor argument named by its slot; None where a
    launch needs what native launches do not do (clusters, scratch memory, tensor descriptors, ...)."""
    ext = module()
    slot_of = {id(t): ext.SLOTS.index(name) for name, t in reversed(slots.items()) if t is not None}
    kinds = {"i32": ext.I32, "i64": ext.I64, "fp32": ext.F32}
    program = []
    for launch in launches:
        if launch is None:  # a launch whose compiled kernel evonorm.triton_kernels could not tell
            return None
        compiled, grid, args = launch
        meta = compiled.metadata
        if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
                or getattr(meta, "launch_pdl", False) or getattr(meta, "global_scratch_size", 0)
                or getattr(meta, "profile_scratch_size", 0) or getattr(meta, "tensordesc_meta", None)
                or len(grid) != 1):
            return None
        packed = []
        for ty, arg in zip(list(compiled.src.signature.values())[:len(args)], args):
            if ty == "constexpr":  # specialised away (an integer 1)
                continue
            if ty.startswith("*") and id(arg) in slot_of:
                packed.append((ext.POINTER, slot_of[id(arg)]))
            elif ty in kinds and not isinstance(arg, torch.Tensor):
                packed.append((kinds[ty], arg))
            else:
                return None
        program.append((compiled.function, grid[0], 32 * meta.num_warps, meta.shared, packed, compiled))
    return program


def add_forward(kind: int, launches: list, y, ws, x, weight, bias, v, running_var, option: int, eps: float,
                momentum: float, flag: bool):
    """Hand a Python-path forward's launches to the C++ side; the key for ``add_backward``, or None."""
    try:
        program = _program(launches, {"y": y, "x": x, "ws": ws, "weight": weight, "bias": bias, "v_or_weight": v,
                                      "running_var": running_var})
        if program is None:
            return None
        why, key = module().add_forward(kind, x, weight, bias, v, running_var, option, eps, momentum, flag,
                                        ws.numel(), program)
    except Exception as err:
        _fail(err)
        return None
    if why:
        _fail(RuntimeError(why))
        return None
    return key


def add_backward(key, launches: list, grad_x, x, grad_y, ws, weight, v) -> None:
    """Hand a Python-path backward's launches to the C++ side, for the key that ``add_forward`` returned. Only with an
    aligned gradient: the native backward aligns the ones it gets."""
    if key is None or grad_y.data_ptr() % 16:
        return
    try:
        program = _program(launches, {"grad_x": grad_x, "x": x, "grad_y": grad_y, "ws": ws, "weight": weight,
                                      "v_or_weight": v})
        why = "" if program is None else module().add_backward(key, program)
    except Exception as err:
        _fail(err)
        return
    if why:
        _fail(RuntimeError(why))
