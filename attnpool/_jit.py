"""Builds the C++ CPU kernels on first use when ``attnpool._C`` is missing.

That happens when attnpool is installed as another package's dependency: pip builds it in
an isolated environment without torch, so no extension can be compiled then. The wheel
ships the C++ sources (``attnpool/_csrc``); this compiles them with
``torch.utils.cpp_extension.load`` into a per-user cache keyed by the torch and Python
versions and the sources, once, and imports the result from there afterwards.

``ATTNPOOL_NO_JIT=1`` turns it off; ``ATTNPOOL_CACHE`` sets the cache folder (default
``$XDG_CACHE_HOME/attnpool`` or ``~/.cache/attnpool``). Only the CPU kernels are built this
way (a CUDA build takes nvcc and many minutes: install with ``--no-build-isolation``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "attnpool_C"  # the module's name inside the cache (PYBIND11_MODULE(TORCH_EXTENSION_NAME))


def openmp_flags() -> list[str]:
    """The compile flags for OpenMP: ``["-fopenmp"]`` when the C++ compiler (``$CXX`` or
    ``c++``) builds an OpenMP program, else ``["-fopenmp-simd"]`` (Apple clang without libomp,
    or ``ATTNPOOL_NO_OPENMP=1``: the kernels' ``omp simd`` loops still vectorise). torch's
    ``at::parallel_for`` is inlined into the kernels and runs them on the intra-op threads only
    with ``-fopenmp``; without it they run on the calling thread. Shared by setup.py and the
    build on first use; link with ``-fopenmp`` only when it is in these flags."""
    if os.environ.get("ATTNPOOL_NO_OPENMP", "0").lower() in ("1", "true", "yes"):
        return ["-fopenmp-simd"]
    compiler = shlex.split(os.environ.get("CXX", "c++"))  # "ccache g++" is one $CXX
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.cpp"
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            run = subprocess.run([*compiler, "-fopenmp", str(src), "-o", str(Path(tmp) / "omp")],
                                 capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return ["-fopenmp-simd"]
    return ["-fopenmp"] if run.returncode == 0 else ["-fopenmp-simd"]


def _sources_root() -> Path | None:
    """The C++ sources: shipped in the package, or the checkout's csrc/ (a development tree)."""
    here = Path(__file__).resolve().parent
    for root in (here / "_csrc", here.parent / "csrc"):
        if (root / "ops.cpp").is_file():
            return root
    return None


def _cache_dir(root: Path, sources: list[Path]) -> Path:
    import torch

    digest = hashlib.sha256()
    # what the build depends on beyond the sources (not the OpenMP test itself: every import
    # would run a compiler)
    for item in (torch.__version__, platform.python_version(), platform.machine(),
                 os.environ.get("CXX", "c++"), os.environ.get("ATTNPOOL_NO_OPENMP", "")):
        digest.update(item.encode() + b"\0")
    for path in sorted(sources + sorted(root.rglob("*.h"))):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    base = os.environ.get("ATTNPOOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "attnpool")
    return Path(base) / f"torch{torch.__version__}-py{platform.python_version()}-{digest.hexdigest()[:16]}"


def _units(root: Path, sources: list[Path], build: Path) -> list[str]:
    """One file per source that includes it, named after its path: cpp_extension.load names each
    object after its source's base name, and csrc/<name>.cpp (an op's registration) and
    csrc/cpu/<name>.cpp (its kernels) would collide."""
    units = build / "units"
    units.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sources:
        unit = units / "_".join(source.relative_to(root).parts)
        unit.write_text(f'#include "{source}"\n')
        paths.append(str(unit))
    return paths


def load():
    """The compiled module (from the cache, or built now), or raises ImportError saying why."""
    if os.environ.get("ATTNPOOL_NO_JIT", "0").lower() in ("1", "true", "yes"):
        raise ImportError("ATTNPOOL_NO_JIT is set")
    root = _sources_root()
    if root is None:
        raise ImportError("the C++ sources are not shipped with this install")
    sources = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    build = _cache_dir(root, sources)
    built = next(iter(sorted(build.glob(f"{NAME}*.so"))), None)
    if built is None:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise ImportError(f"no C++ compiler ({compiler}) to build the kernels with")
        from torch.utils import cpp_extension

        build.mkdir(parents=True, exist_ok=True)
        print(f"attnpool: building the C++ kernels for this torch into {build} "
              "(first use only; a few minutes)...", file=sys.stderr, flush=True)
        openmp = openmp_flags()
        if "-fopenmp" not in openmp:
            print("attnpool: no OpenMP for this compiler; the CPU kernels will run on one "
                  "thread", file=sys.stderr, flush=True)
        try:
            return cpp_extension.load(
                NAME, _units(root, sources, build), extra_include_paths=[str(root)],
                extra_cflags=["-O3"] + openmp,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in openmp else [], build_directory=str(build),
                verbose=False)
        except Exception as e:  # a compiler error: say so, and fall back
            raise ImportError(f"building the C++ kernels failed: {e}") from e
    spec = importlib.util.spec_from_file_location(
        NAME, built, loader=importlib.machinery.ExtensionFileLoader(NAME, str(built)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
