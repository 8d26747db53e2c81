"""Fused float32 CPU kernels (``cpu_kernels.cpp``): one call per layer forward and one per backward.

On small maps the eager stages' cost is per call, not per byte (~40-110 ATen calls, each a few microseconds, and the
Python between them). The C++ kernels do the same arithmetic in two passes over the input per direction, with the
per-(n, c) algebra in between and loops the compiler vectorizes; a layer call (``batch_act``, ``sample_act``) is a
C++ autograd node around them, since a Python autograd function alone costs more than they do on small maps.
Channels-last inputs keep their layout: the kernels loop over channels innermost there (no copy in or out), which is
also what makes 1x1 and 2x2 maps cheap (a MobileNet's last stages at 28 px).

They are built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; some 20 s, once per
machine and CPU capability: the build directory is cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) and registered as ``torch.ops.evonorm_cpu``. evonorm.fused calls them through
``ops()``; a failed build raises here, and evonorm.fused then warns once and keeps the eager stages.
"""
from __future__ import annotations

import logging
import os
import shutil
from functools import cache

import torch

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels.cpp")
# Instruction sets per torch's CPU capability (the build is specific to it, and so is its name).
ARCH_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
              "AVX2": ["-mavx2", "-mfma"]}


def cpp_extension():
    """torch.utils.cpp_extension, ready to build: with ninja on PATH, imported without its warning about CUDA (the
    extensions of evonorm are C++ only)."""
    if shutil.which("ninja") is None:  # pip's ninja (a dependency) where its scripts are not on PATH
        import ninja
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import warns that there is no CUDA toolkit: irrelevant to a C++ build
    try:
        from torch.utils import cpp_extension as module
    finally:
        cpp_logger.setLevel(level)
    return module


@cache
def ops():
    """torch.ops.evonorm_cpu, built and loaded on the first call."""
    capability = torch.backends.cpu.get_cpu_capability()
    log.info("evonorm: loading the fused CPU kernels (the first build on a machine takes some 20 s)")
    cpp_extension().load(
        name=f"evonorm_cpu_{capability.lower()}", sources=[SOURCE], is_python_module=False,
        # Reassociation lets a SIMD sum end in a tree, not lane by lane. No -ffast-math: NaN and infinity checks
        # must stay (running-variance update, NaN propagation).
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
                      "-fno-signed-zeros", *ARCH_FLAGS.get(capability, [])],
        extra_ldflags=["-fopenmp"])
    return torch.ops.evonorm_cpu
