"""Portable-build check of the C++ CPU kernels, without building or linking anything:

* every csrc/cpu/*.cpp and csrc/ops.cpp compiled (-c, -O2) for aarch64 with Debian's cross
  compiler against the installed torch's headers, with OpenMP (Linux on ARM) and without it
  (-fopenmp-simd, as Apple silicon's clang builds them): the x86 intrinsics must stay behind
  their guards, and the generic paths must compile for another ISA;
* the same sources through the native compiler without OpenMP (-fsyntax-only).

    python .ci/cross_compile.py [--cxx aarch64-linux-gnu-g++]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cxx", default="aarch64-linux-gnu-g++")
    args = p.parse_args()
    if shutil.which(args.cxx) is None:
        print(f"{args.cxx} not found (apt-get install g++-aarch64-linux-gnu)")
        return 1
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) + \
        [os.path.join(ROOT, "csrc", "ops.cpp")]
    flags = ["-std=c++20", "-Wall", "-I" + os.path.join(ROOT, "csrc"),
             "-I" + sysconfig.get_paths()["include"], "-DTORCH_EXTENSION_NAME=_C",
             "-DTORCH_API_INCLUDE_EXTENSION_H"] + ["-I" + d for d in cpp_extension.include_paths()]
    tmp = tempfile.TemporaryDirectory()
    jobs = [(f"aarch64 {omp} {os.path.relpath(s, ROOT)}",
             [args.cxx, "-O2", omp, "-c", s, "-o", os.path.join(tmp.name, f"{omp}{i}.o")] + flags)
            for omp in ("-fopenmp", "-fopenmp-simd") for i, s in enumerate(sources)]
    jobs += [(f"x86 -fopenmp-simd {os.path.relpath(s, ROOT)}",
              [os.environ.get("CXX", "c++"), "-fsyntax-only", "-fopenmp-simd", s] + flags)
             for s in sources]

    def run(job):
        name, cmd = job
        r = subprocess.run(cmd, capture_output=True, text=True)
        return name, r.returncode, r.stderr

    failed = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for name, rc, err in pool.map(run, jobs):
            print(f"  {'ok  ' if rc == 0 else 'FAIL'} {name}", flush=True)
            if rc != 0:
                failed += 1
                print(err[-4000:])
    tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
