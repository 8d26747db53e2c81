"""A stand-in CUDA driver for machines without a GPU: Triton's own CUDA backend over a recording libcuda.

``activate`` builds ``fake_libcuda.c`` (gcc, against the ``cuda.h`` that Triton ships) and makes Triton's real CUDA
driver the active one over it: kernels compile to real cubins (Triton's ptxas), load as stand-in handles, and launch
through Triton's C launcher (or evonorm's native launches) into the stand-in, which records each launch's
configuration and parameter bytes and runs nothing. Each kernel's parameter sizes come from its cubin (cuobjdump's
``EIATTR_KPARAM_INFO``), so the bytes recorded are what a GPU would get. CPU tensors stand for device memory.

It changes the process for good (environment, Triton's driver, the loaded libcuda): use it in a process of its own.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_libcuda.c")
MAX_PARAM_BYTES = 512


class _Launch(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint64), ("stream", ctypes.c_uint64), ("grid", ctypes.c_uint * 3),
                ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint), ("attributes", ctypes.c_uint),
                ("param_bytes", ctypes.c_uint), ("known", ctypes.c_int),
                ("bytes", ctypes.c_ubyte * MAX_PARAM_BYTES)]


def _nvidia_folder() -> Path:
    import triton.backends.nvidia as nvidia

    return Path(nvidia.__file__).parent


def kernel_param_sizes(cubin: bytes) -> list[int]:
    """The byte sizes of a compiled kernel's parameters, in order, as its cubin declares them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([_nvidia_folder() / "bin" / "cuobjdump", "-elf", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = re.findall(r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*(0x[0-9a-f]+)\s+Size\s*:\s*(0x[0-9a-f]+)", dump)
    params = sorted((int(ordinal, 16), int(size, 16)) for ordinal, _, size in found)
    assert [ordinal for ordinal, _ in params] == list(range(len(params))), dump[-2000:]
    return [size for _, size in params]


class FakeDriver:
    """The loaded stand-in: its recorded launches."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.params: dict[int, list[int]] = {}  # parameter sizes by kernel handle
        lib.fake_launch.restype = ctypes.POINTER(_Launch)
        lib.fake_set_params.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint), ctypes.c_uint]

    def set_params(self, function: int, sizes: list[int]) -> None:
        """What the stand-in reports (cuFuncGetParamInfo) and records of this kernel's parameters."""
        self.params[function] = list(sizes)
        self.lib.fake_set_params(function, (ctypes.c_uint * len(sizes))(*sizes), len(sizes))

    def reset(self) -> None:
        self.lib.fake_reset()

    def launches(self) -> list[dict]:
        """Each launch since the last reset: function handle, grid, block, shared bytes, stream, launch attributes
        and the parameter bytes (None for a kernel whose parameters are unknown)."""
        out = []
        for i in range(self.lib.fake_launch_count()):
            launch = self.lib.fake_launch(i).contents
            out.append({"function": launch.function, "grid": tuple(launch.grid), "block": tuple(launch.block),
                        "shared": launch.shared, "stream": launch.stream, "attributes": launch.attributes,
                        "params": bytes(launch.bytes[:launch.param_bytes]) if launch.known else None})
        return out


def activate(folder: str | os.PathLike) -> FakeDriver:
    """Build the stand-in libcuda into ``folder`` and make Triton's CUDA driver over it the active one (device 0,
    stream 0, sm_90), with the Triton stages taken for CPU tensors (evonorm.fused)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    from evonorm import fused

    library = Path(folder) / "libcuda.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", f"-I{_nvidia_folder() / 'include'}",
                    "-Wl,-soname,libcuda.so.1", "-o", str(library), str(SOURCE)], check=True)
    fake = FakeDriver(ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL))
    os.environ["TRITON_LIBCUDA_PATH"] = str(folder)
    cuda = CudaDriver()
    cuda.get_current_device = lambda: 0
    cuda.get_current_stream = lambda device=None: 0
    cuda.get_current_target = lambda: GPUTarget("cuda", 90, 32)
    load_binary = cuda.utils.load_binary

    def load_and_describe(name, cubin, *args):
        loaded = load_binary(name, cubin, *args)  # (module, function, registers, spills, threads)
        fake.set_params(loaded[1], kernel_param_sizes(cubin))
        return loaded

    cuda.utils.load_binary = load_and_describe
    driver.set_active(cuda)
    fused._triton_state.update(force=True, failed=False)
    return fake
