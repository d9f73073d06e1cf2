"""Build of attnpool and its optional compiled extension attnpool._C.

Environment flags (flash-attention style):
  ATTNPOOL_FORCE_CUDA=1  build the CUDA kernels even if no GPU is visible
  ATTNPOOL_SKIP_CUDA=1   never build the CUDA kernels
  ATTNPOOL_SKIP_EXT=1    build no extension at all (pure-Python install)
  MAX_JOBS=N             parallel compile jobs (ninja)
  ATTNPOOL_CUDA_ARCHS    e.g. "80;90" (default "80;90")
"""

import glob
import os
import shutil
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def extension_setup() -> dict:
    if _flag("ATTNPOOL_SKIP_EXT"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # An isolated build has no torch: install the pure-Python package; at
        # import time attnpool warns once and uses the Triton / reference backends.
        warnings.warn("attnpool: torch not importable at build time; building without attnpool._C",
                      stacklevel=1)
        return {}

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is torch's own: cpp_extension adds the one its headers need.
    cxx = ["-O3"]
    if not _flag("ATTNPOOL_NO_OPENMP"):
        cxx += ["-fopenmp"]
    nvcc_found = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    want_cuda = not _flag("ATTNPOOL_SKIP_CUDA") and (
        _flag("ATTNPOOL_FORCE_CUDA") or (torch.version.cuda is not None and torch.cuda.is_available())
    )
    if want_cuda and (torch.version.cuda is None or not nvcc_found):
        warnings.warn("attnpool: CUDA build requested but torch has no CUDA or nvcc is missing; "
                      "building the CPU kernels only", stacklevel=1)
        want_cuda = False

    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda:
        archs = os.environ.get("ATTNPOOL_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_torch.cpp"))
        ext = CUDAExtension(
            "attnpool._C", sources, include_dirs=include_dirs,
            define_macros=[("ATTNPOOL_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"] + gencode},
        )
    else:
        ext = CppExtension("attnpool._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
                           if "-fopenmp" in cxx else [])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    packages=["attnpool", "attnpool.kernels"],
    package_dir={"attnpool.kernels": "kernels"},
    **extension_setup(),
)
