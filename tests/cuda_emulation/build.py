"""Builds csrc/cuda/*.cu for the host through the CUDA emulation (transform.py + cuda_emu.h)
into one shared library and loads it with ctypes. Used by tests/test_cuda_emulation.py.

    python tests/cuda_emulation/build.py OUT_DIR     # builds OUT_DIR/libattnpool_cuda_emu.so
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CUDA_SRC = REPO / "csrc" / "cuda"
LIB_NAME = "libattnpool_cuda_emu.so"
CXXFLAGS = ["-O2", "-std=c++17", "-pthread", "-fPIC", "-ffp-contract=off", "-g0"]


class BuildError(RuntimeError):
    pass


def _transform():
    spec = importlib.util.spec_from_file_location("cuda_emu_transform", HERE / "transform.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(out_dir: Path, cxx: str | None = None, jobs: int | None = None,
          src_dir: Path = CUDA_SRC) -> Path:
    """Transforms the sources of src_dir into out_dir, compiles every .cu, the runtime and the C entry
    points (in parallel), links out_dir/libattnpool_cuda_emu.so. BuildError carries the
    compiler's output."""
    out_dir = Path(out_dir)
    cxx = cxx or os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"C++ compiler {cxx!r} not found")
    cus = _transform().prepare(src_dir, out_dir)
    if not cus:
        raise BuildError(f"no .cu sources in {src_dir}")
    inc = ["-I", str(out_dir / "shim"), "-I", str(out_dir / "src"), "-I", str(HERE)]
    units = [(["-x", "c++", str(cu)], out_dir / (cu.stem + ".o")) for cu in cus]
    units += [([str(HERE / "cuda_emu_runtime.cpp")], out_dir / "cuda_emu_runtime.o"),
              ([str(HERE / "emu_entry.cpp")], out_dir / "emu_entry.o")]
    jobs = jobs or os.cpu_count() or 1
    failures = []
    pending = list(units)
    running: list[tuple[subprocess.Popen, list[str]]] = []
    while pending or running:
        while pending and len(running) < jobs:
            src, obj = pending.pop(0)
            cmd = [cxx, *CXXFLAGS, *inc, "-c", *src, "-o", str(obj)]
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True), cmd))
        proc, cmd = running.pop(0)
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(cmd)}\n{output}")
    if failures:
        raise BuildError("compiling the emulated CUDA sources failed:\n" + "\n".join(failures))
    lib = out_dir / LIB_NAME
    cmd = [cxx, "-shared", "-pthread", "-o", str(lib), *(str(obj) for _, obj in units)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"linking failed:\n$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    return lib


def load(lib_path: Path) -> ctypes.CDLL:
    """The library with the argument and result types of its entry points declared."""
    lib = ctypes.CDLL(str(lib_path))
    i64, i32, dbl, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    vpp = ctypes.POINTER(ctypes.c_void_p)
    i64p = ctypes.POINTER(ctypes.c_int64)
    sig = {
        "emu_attention_cluster_forward": (i32, [i32, vp, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64,
                                                i64, i32, dbl, dbl]),
        "emu_attention_cluster_backward_workspace_elems": (i64, [i32, i64, i64, i64]),
        "emu_attention_cluster_backward": (i32, [i32] + [vp] * 13 + [i64, i64, i64, i64, i32, dbl, dbl]),
        "emu_attentional_pooling_num_tiles": (i64, [i64]),
        "emu_attentional_pooling_forward_workspace_elems": (i64, [i32, i64, i64, i64, i64]),
        "emu_attentional_pooling_backward_workspace_elems": (i64, [i32, i64, i64, i64, i64]),
        "emu_attentional_pooling_forward": (i32, [i32, vp, i32, vp, vp, vp, vp, vp, i64, i64, i64, i64]),
        "emu_attentional_pooling_backward": (i32, [i32, vp, vp, vp, i32, vp, vp, vp, vp, vp, vp,
                                       i64, i64, i64, i64]),
        "emu_weighted_pool_forward_workspace_elems": (i64, [i32, i64, i64, i64, i64]),
        "emu_weighted_pool_backward_workspace_elems": (i64, [i32, i64, i64, i64, i64]),
        "emu_weighted_pool_forward": (i32, [i32, vp, i32, vp, vp, vp, i64, i64, i64, i64]),
        "emu_weighted_pool_backward": (i32, [i32, vp, vp, i32, vp, vp, vp, vp, i64, i64, i64, i64]),
        "emu_st_regularizer_forward_workspace_elems": (i64, [i32, i64, i64, i64, i64]),
        "emu_st_regularizer_forward": (i32, [i32, vp, vp, vp, vp, i64, i64, i64, i64, dbl, dbl, dbl,
                                 i32, i32, i32]),
        "emu_st_regularizer_backward": (i32, [i32, vp, vp, vp, vp, vp, i64, i64, i64, i64, dbl, dbl, dbl,
                                  i32, i32, i32]),
        "emu_pyramid_attention_forward_workspace_elems": (i64, [i32, i64, i64, i32, i64p, i64p, i64p]),
        "emu_pyramid_attention_backward_workspace_elems": (i64, [i32, i64, i64, i32, i64p, i64p, i64p]),
        "emu_pyramid_attention_forward": (i32, [i32, i64, i64, i32, i64p, i64p, i64p, vpp, vpp, vp, dbl,
                                      dbl, vp, vp, vp, vp, vp]),
        "emu_pyramid_attention_backward": (i32, [i32, i64, i64, i32, i64p, i64p, i64p, vp, vp, vp, vp,
                                       vpp, dbl, dbl, vpp, vpp, vp, vp]),
        "cuda_emu_last_message": (ctypes.c_char_p, []),
        "cuda_emu_clear_message": (None, []),
        "cuda_emu_set_schedule": (None, [i32, ctypes.c_uint64]),
        "cuda_emu_take_log": (ctypes.c_char_p, []),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(build(Path(sys.argv[1])))
