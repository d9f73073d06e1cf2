"""Build of attnpool and its optional compiled extension attnpool._C.

Environment flags (flash-attention style):
  ATTNPOOL_FORCE_CUDA=1  build the CUDA kernels even if no GPU is visible
  ATTNPOOL_SKIP_CUDA=1   never build the CUDA kernels
  ATTNPOOL_SKIP_EXT=1    build no extension at all (pure-Python install)
  ATTNPOOL_NO_OPENMP=1   compile without OpenMP (also automatic where the compiler lacks it,
                         e.g. Apple clang; the CPU kernels then run on one thread)
  MAX_JOBS=N             parallel compile jobs (ninja)
  ATTNPOOL_CUDA_ARCHS    e.g. "80;90" (default "80;90")
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _find_cuda_home() -> None:
    """Sets CUDA_HOME to the toolkit of the nvcc on PATH, as nvcc itself reports it (the TOP
    of `nvcc --dryrun`), when it is not set. torch guesses it from the folder nvcc is in,
    which is wrong when that nvcc is a wrapper script (say /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc): the build then misses cuda_runtime_api.h."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime_api.h")):
        return
    try:
        run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            home = os.path.realpath(line.split("=", 1)[1].strip().strip('"'))
            if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
                os.environ["CUDA_HOME"] = home
            return


def _openmp_flags() -> list[str]:
    """attnpool/_jit.py's openmp_flags (one home for the test; that file imports no torch)."""
    spec = importlib.util.spec_from_file_location("_attnpool_jit",
                                                  os.path.join(ROOT, "attnpool", "_jit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.openmp_flags()


def extension_setup() -> dict:
    if _flag("ATTNPOOL_SKIP_EXT"):
        return {}
    _find_cuda_home()  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # An isolated build has no torch: install the pure-Python package; at
        # import time attnpool warns once and uses the Triton / reference backends.
        warnings.warn("attnpool: torch not importable at build time; building without attnpool._C",
                      stacklevel=1)
        return {}

    # csrc/*.cpp: the module init and each op's registration; csrc/cpu: the CPU kernels
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is torch's own: cpp_extension adds the one its headers need.
    openmp = _openmp_flags()
    link = ["-fopenmp"] if "-fopenmp" in openmp else []
    if not link:
        warnings.warn("attnpool: no OpenMP (ATTNPOOL_NO_OPENMP, or the compiler lacks it): the "
                      "CPU kernels will run on one thread", stacklevel=1)
    cxx = ["-O3", "-g0"] + openmp  # -g0: no debug info (a 3x smaller library, a faster build)
    nvcc_found = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    want_cuda = not _flag("ATTNPOOL_SKIP_CUDA") and (
        _flag("ATTNPOOL_FORCE_CUDA") or (torch.version.cuda is not None and torch.cuda.is_available())
    )
    if want_cuda and (torch.version.cuda is None or not nvcc_found):
        warnings.warn("attnpool: CUDA build requested but torch has no CUDA or nvcc is missing; "
                      "building the CPU kernels only", stacklevel=1)
        want_cuda = False

    include_dirs = [os.path.join(ROOT, "csrc")]
    # py_limited_api: Python's stable ABI only and no libtorch_python, so that a process
    # without Python (a C++ program running an AOTInductor package) can load the library
    # (csrc/ops.cpp); one build serves every Python version.
    if want_cuda:
        archs = os.environ.get("ATTNPOOL_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_torch.cpp"))
        ext = CUDAExtension(
            "attnpool._C", sources, include_dirs=include_dirs,
            define_macros=[("ATTNPOOL_WITH_CUDA", None),
                           ("ATTNPOOL_CUDA_ARCHS", "_".join(a for a in archs if a))],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"] + gencode}, extra_link_args=link,
            py_limited_api=True,
        )
    else:
        ext = CppExtension("attnpool._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link,
                           py_limited_api=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    # attnpool._csrc: the C++/CUDA sources, shipped so that an install without attnpool._C
    # (an isolated build, as a dependency) can build the CPU kernels on first use
    # (attnpool/_jit.py).
    packages=["attnpool", "attnpool.kernels", "attnpool._csrc", "attnpool._csrc.cpu",
              "attnpool._csrc.cuda"],
    package_dir={"attnpool.kernels": "kernels", "attnpool._csrc": "csrc"},
    package_data={"attnpool._csrc": ["*.h", "*.cpp"], "attnpool._csrc.cpu": ["*.h", "*.cpp"],
                  "attnpool._csrc.cuda": ["*.h", "*.cuh", "*.cu", "*.cpp"]},
    **extension_setup(),
)
