"""Ahead-of-time compile of every Triton kernel of attnpool for sm_80 and sm_90a (no GPU needed).

    python tests/aot_triton.py [--json PATH] [--write PATH.md] [--jobs N]

1. Record: the launchers of kernels/*.py are called on ``meta`` tensors (nothing is
   allocated) at the benchmark shapes, in float32, float16 and bfloat16, with
   ``JITFunction.__getitem__`` replaced by a recorder, so every ``kernel[grid](*args, **kw)``
   is captured instead of launched, with exactly the block sizes and options the launchers
   pick.
2. Specialise: each launch goes through Triton's own binder (the code ``JITFunction.run``
   uses), so the signature (pointer dtypes, i32 / i64 by value, fp32 for Python floats, an
   int equal to 1 as a constexpr), the divisibility-by-16 attributes, the constexprs and the
   options (num_warps, num_stages, enable_fp_fusion, ...) are what a launch on a GPU would
   compile. Meta tensors report data_ptr() 0 (plus their storage offset), i.e. aligned like a
   fresh CUDA allocation.
3. Compile (deduplicated) for GPUTarget("cuda", 80, 32) -> sm_80 and GPUTarget("cuda", 90, 32)
   -> sm_90a (Triton appends the "a" for capability >= 90) in a process pool, in a fresh
   Triton cache directory that is deleted afterwards.
4. Read each cubin's resource usage with Triton's cuobjdump (REG, STACK, SHARED, LOCAL) and
   ptxas -v's spill stores / loads; shared memory per block = cuobjdump's static SHARED +
   Triton's dynamic ``metadata.shared``.

Fails (exit status 1) on a compile error, a kernel with local memory or spills, shared
memory over the per-block limit (sm_80: 163 KiB, sm_90: 227 KiB), a launched kernel that
was never recorded, or a missing cuobjdump / triton.compile (exit status 2). The test
tests/test_aot.py runs this script in a subprocess (TRITON_INTERPRET=0: the test suite
runs Triton interpreted); importing this module has no side effects and needs no triton.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

# per-block shared memory limits (static + dynamic, opt-in maximum) by compute capability
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Spill (stack / local memory) of at most this many bytes per thread is accepted and listed,
# as benchmarks/cuda_resources.py does for the CUDA kernels: a few kernels at a few
# configurations keep some words of loop state on the stack (in L1) under their register
# budget, and shrinking their tiles only moved the spills elsewhere (benchmarks/NOTES.md).
# Whether other tiles are faster is a GPU measurement. Anything larger fails.
MAX_SPILL_BYTES = 48
ARCHS = (80, 90)
REGS_PER_SM = 65536
KERNEL_MODULES = ("attention_cluster", "attentional_pool", "st_regularizer", "pyramid_attention")
DTYPES = ("float32", "float16", "bfloat16", "float64")  # float64: its dots need out_dtype


# =============================================================================== recording
@dataclasses.dataclass
class Launch:
    fn: object  # triton.runtime.jit.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str = ""


@contextlib.contextmanager
def recording():
    """Replace ``JITFunction.__getitem__``: ``kernel[grid](*args, **kw)`` appends a Launch
    to the yielded list and launches nothing."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            launches.append(Launch(self, tuple(grid) if not callable(grid) else grid, args,
                                   dict(kwargs)))
        return launch

    had = "__getitem__" in JITFunction.__dict__
    old = JITFunction.__dict__.get("__getitem__")
    JITFunction.__getitem__ = getitem
    try:
        yield launches
    finally:
        if had:
            JITFunction.__getitem__ = old
        else:
            del JITFunction.__getitem__


def _cases():
    """(case label, thunk) per launcher call, at the benchmark shapes, every dtype."""
    import torch
    from attnpool.kernels import attention_cluster as ac
    from attnpool.kernels import attentional_pool as ap
    from attnpool.kernels import pyramid_attention as pa
    from attnpool.kernels import st_regularizer as st

    meta = "meta"
    f32 = torch.float32

    def e(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device=meta)

    for dname in DTYPES:
        dt = getattr(torch, dname)

        # ---- attention cluster: B, L, F, N (benchmark shape first, then the sweep points)
        def cluster(B, L, F, N, shift=True, lengths=False, grad_attn=False, dt=dt):
            stat = torch.float64 if dt == torch.float64 else f32
            x, s = e(B, L, F, dtype=dt), e(B, L, N, dtype=stat)
            alpha, beta = e(N, dtype=dt), e(N, dtype=dt)
            ln = e(B, dtype=torch.int64) if lengths else None
            out, attn, norm = ac.cluster_pool_forward(x, s, ln, alpha, beta, shift, 1e-12, 0.0)
            ac.cluster_pool_backward(e(B, N * F, dtype=dt), x, attn, norm, alpha, beta, ln,
                                     shift, 1e-12, 0.0,
                                     grad_attn=e(B, N, L, dtype=f32) if grad_attn else None)

        for (B, L, F, N) in [(128, 25, 2048, 64), (128, 25, 2048, 8), (128, 25, 2048, 256),
                             (128, 8, 2048, 64), (128, 300, 2048, 64)]:
            yield (f"attention_cluster B={B},L={L},F={F},N={N} {dname}",
                   lambda a=(B, L, F, N): cluster(*a))
        yield (f"attention_cluster B=128,L=25,F=2048,N=64 shift=False {dname}",
               lambda: cluster(128, 25, 2048, 64, shift=False))
        yield (f"attention_cluster B=128,L=25,F=2048,N=64 lengths,grad_attn {dname}",
               lambda: cluster(128, 25, 2048, 64, lengths=True, grad_attn=True))
        yield (f"attention_cluster B=128,L=300,F=2048,N=64 lengths,grad_attn {dname}",
               lambda: cluster(128, 300, 2048, 64, lengths=True, grad_attn=True))

        # ---- attentional pooling / weighted pool: x [B*T, C, H*W] (n- or C-contiguous)
        def attpool(B, C, H, W, P, channels_last=False, dt=dt):
            if channels_last:  # what x.reshape(B, C, H*W) of a channels-last map gives
                x = e(B, H, W, C, dtype=dt).permute(0, 3, 1, 2).reshape(B, C, H * W)
            else:
                x = e(B, C, H * W, dtype=dt)
            wb, bb = e(P, C, dtype=dt), e(P, dtype=dt)
            z, h = ap.attentional_pool_forward(x, wb, bb)
            ap.attentional_pool_backward(e(B, P, C, dtype=dt), e(B, P, H * W, dtype=f32), x, h, wb)
            ap.weighted_pool_forward(x, h)
            ap.weighted_pool_backward(e(B, P, C, dtype=dt), x, h)

        yield f"attentional_pool B=256,C=2048,14x14,P=1 {dname}", lambda: attpool(256, 2048, 14, 14, 1)
        yield (f"attentional_pool B=256,C=2048,14x14,P=1 channels_last {dname}",
               lambda: attpool(256, 2048, 14, 14, 1, channels_last=True))
        yield f"attentional_pool B=256,C=2048,14x14,P=4 {dname}", lambda: attpool(256, 2048, 14, 14, 4)
        # not a benchmark shape: the only way to reach _attpool_bwd_x_kernel (P > MAX_BLOCK_P)
        p_big = 2 * ap.MAX_BLOCK_P
        yield (f"attentional_pool B=256,C=2048,14x14,P={p_big} {dname}",
               lambda p=p_big: attpool(256, 2048, 14, 14, p))

        # ---- spatio-temporal regulariser: mask [B, T, H, W], w [B, T]
        def streg(B, T, H, W, sqrt=True, mean=True, dt=dt):
            mask, w = e(B, T, H, W, dtype=dt), e(B, T, dtype=dt)
            params = (1e-5, 1e-4, 1.0, sqrt, mean, mean)
            st.st_regularizer_forward(mask, w, *params)
            st.st_regularizer_backward(e((), dtype=dt), mask, w, *params)

        yield f"st_regularizer B=30,T=20,7x7 {dname}", lambda: streg(30, 20, 7, 7)
        yield (f"st_regularizer B=30,T=20,7x7 sqrt=False,sum {dname}",
               lambda: streg(30, 20, 7, 7, sqrt=False, mean=False))

        # ---- pyramid attention: maps [B, T, C_s, H_s, W_s], weights [C_s], bias [S]
        def pyramid(B, T, levels, dt=dt):
            xs = [e(B, T, C, H, H, dtype=dt) for C, H in levels]
            ws = [e(C, dtype=dt) for C, _ in levels]
            bias = e(len(levels), dtype=dt)
            out, loss, pooled, y = pa.pyramid_attention_forward(xs, ws, bias, 1e-12, 1.0)
            sizes = [s for _, H in levels for s in (H, H)]
            pa.pyramid_attention_backward(e(*out.shape, dtype=dt), e((), dtype=dt), pooled, y, ws,
                                          1e-12, 1.0, sizes)

        levels = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
        yield f"pyramid_attention B=64,T=1,C=256..2048,56..7 {dname}", lambda lv=levels: pyramid(64, 1, lv)


def record() -> list[Launch]:
    launches: list[Launch] = []
    for case, thunk in _cases():
        with recording() as rec:
            thunk()
        for la in rec:
            la.case = case
        launches += rec
    return launches


def entry_kernels() -> dict[str, str]:
    """{module.name: module} of every JITFunction that kernels/*.py launches (``name[``)."""
    import inspect

    from triton.runtime.jit import JITFunction

    found = {}
    for mod in KERNEL_MODULES:
        m = importlib.import_module(f"attnpool.kernels.{mod}")
        src = inspect.getsource(m)
        for name, obj in vars(m).items():
            if isinstance(obj, JITFunction) and obj.__module__ == m.__name__ \
                    and re.search(rf"\b{re.escape(name)}\[", src):
                found[f"{mod}.{name}"] = m.__name__
    return found


# =============================================================================== specialising
def specialise(la: Launch, cap: int) -> dict:
    """What JITFunction.run would compile for this launch on a GPU of capability ``cap``:
    a picklable job (module, kernel, signature, constexprs, attrs, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = la.fn
    backend = make_backend(GPUTarget("cuda", cap, 32))
    kwargs = dict(la.kwargs)  # as in JITFunction.run
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # as far as this Triton has them
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*la.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    declared = {p.num: p.name for p in fn.params if p.is_constexpr}
    # the kernel's constexpr parameters (block sizes, flags), not ints specialised to 1
    cx_named = {declared[k[0]]: str(v) for k, v in constexprs.items()
                if len(k) == 1 and k[0] in declared}
    # the int scalars of this launch (an example: deduplicated launches differ in them)
    ints = {p.name: bound_args[p.name] for p in fn.params if not p.is_constexpr
            and isinstance(bound_args[p.name], int) and not isinstance(bound_args[p.name], bool)}
    return dict(module=fn.__module__, name=fn.__name__, cap=cap, signature=signature,
                constexprs=constexprs, attrs=attrs, options=dict(options.__dict__),
                cx_named=cx_named, example=dict(case=la.case, grid=str(la.grid), ints=ints))


def job_key(job: dict) -> str:
    opts = {k: v for k, v in sorted(job["options"].items())}
    return repr((job["module"], job["name"], job["cap"], sorted(job["signature"].items()),
                 sorted((k, repr(v)) for k, v in job["constexprs"].items()),
                 sorted((k, repr(v)) for k, v in job["attrs"].items()), opts))


# =============================================================================== compiling
_RES_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def cuobjdump_path() -> str:
    from triton import knobs
    return knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes, workdir: str) -> dict[str, dict]:
    """cuobjdump --dump-resource-usage of a cubin: {function: {REG, STACK, SHARED, LOCAL}}."""
    fd, path = tempfile.mkstemp(suffix=".cubin", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    res = {m.group(1): dict(REG=int(m.group(2)), STACK=int(m.group(3)), SHARED=int(m.group(4)),
                            LOCAL=int(m.group(5))) for m in _RES_RE.finditer(out)}
    if not res:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return res


def compile_job(job: dict) -> dict:
    """Compile one job (in a worker process); returns its resources or its error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    result = dict(key=job["key"], error=None)
    log = io.StringIO()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v (spill stores / loads) is printed
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                      target=GPUTarget("cuda", job["cap"], 32), options=job["options"])
        md = compiled.metadata
        usage = resource_usage(compiled.asm["cubin"], tempfile.gettempdir())
        if md.name not in usage:
            raise RuntimeError(f"{md.name} not in cuobjdump's output ({sorted(usage)})")
        u = usage[md.name]
        spills = [tuple(int(g) for g in m.groups()) for m in _SPILL_RE.finditer(log.getvalue())]
        stack, st_bytes, ld_bytes = spills[-1] if spills else (u["STACK"], 0, 0)
        result.update(regs=u["REG"], stack=u["STACK"], static_shared=u["SHARED"], local=u["LOCAL"],
                      dyn_shared=int(md.shared), shared=u["SHARED"] + int(md.shared),
                      spill_stores=st_bytes, spill_loads=ld_bytes, num_warps=md.num_warps,
                      num_stages=md.num_stages, enable_fp_fusion=md.enable_fp_fusion,
                      arch=f"sm_{job['cap']}" + ("a" if job["cap"] >= 90 else ""))
    except Exception:  # reported, not raised: every other kernel still gets compiled
        tb = traceback.format_exc()
        result["error"] = (log.getvalue()[-4000:] + "\n" + tb[-4000:]).strip()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _problems(r: dict, cap: int) -> list[str]:
    if r["error"]:
        return ["compile error"]
    out = []
    # spills land in the stack frame (cuobjdump STACK; its LOCAL stays 0): all local memory.
    # float64 is the exact-gradient path, not a speed path: it must compile, it may spill.
    if max(r["local"], r["stack"], r["spill_stores"]) > MAX_SPILL_BYTES and \
            r["dtype"] != "float64":  # (a compile shared with float32 is still checked)
        out.append(f"local memory above {MAX_SPILL_BYTES} B: stack {r['stack']} B, local "
                   f"{r['local']} B, spill stores {r['spill_stores']} B, loads "
                   f"{r['spill_loads']} B")
    if r["shared"] > SHARED_LIMIT[cap]:
        out.append(f"shared memory {r['shared']} B > {SHARED_LIMIT[cap]} B")
    if r["regs"] * r["num_warps"] * 32 > REGS_PER_SM:
        out.append(f"{r['regs']} registers x {r['num_warps'] * 32} threads > {REGS_PER_SM}")
    return out


# =============================================================================== report
def _config(job: dict) -> str:
    """num_warps, num_stages, FP fusion off, BLOCK_* and the other int / True constexprs."""
    parts = [f"w={job['options']['num_warps']}", f"s={job['options']['num_stages']}"]
    if not job["options"]["enable_fp_fusion"]:
        parts.append("no-fma")
    cx = job["cx_named"]
    parts += [f"{k}={v}" for k, v in cx.items() if k.startswith("BLOCK_")]
    parts += [f"{k}={v}" for k, v in cx.items() if not k.startswith("BLOCK_") and v.isdigit()]
    parts += [k for k, v in cx.items() if v == "True"]
    return " ".join(parts)


def markdown(report: dict) -> str:
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        "Generated by `python tests/aot_triton.py --write benchmarks/results/triton_aot.md` "
        f"(Triton {report['triton']}, torch {report['torch']}); checked by `tests/test_aot.py`.",
        "Every launch the launchers of `kernels/*.py` make at the benchmark shapes (attention",
        "cluster B=128, L=25, F=2048, N=64 and N in {8, 256}, L in {8, 300}, plus shift=False and",
        "lengths + grad_attn; attentional / weighted pool B*T=256, C=2048, 14x14, P=1 (also",
        "channels-last x, P=4, and P=64, the only way to reach `_attpool_bwd_x_kernel`);",
        "st regulariser B=30, T=20, 7x7 (also sqrt=False, sum);",
        "pyramid B=64, C=256..2048 at 56..7), recorded on meta tensors, specialised by Triton's",
        "own binder and compiled for sm_80 and sm_90a. Registers, stack and local memory from",
        "`cuobjdump --dump-resource-usage`; spills from `ptxas -v`; shared = static (cuobjdump)",
        "+ dynamic (Triton metadata), per block. Limits: shared <= 163 KiB (sm_80), 227 KiB",
        f"(sm_90); stack / local memory / spill stores at most {MAX_SPILL_BYTES} B per thread",
        "(smaller spills are listed here, not failed: see MAX_SPILL_BYTES).",
        "",
        f"{report['n_launches']} launches recorded, {report['n_compiled']} distinct compiles, "
        f"{report['n_problems']} problem(s).",
        "",
        "Config: w = num_warps, s = num_stages, no-fma = enable_fp_fusion=False, then the",
        "BLOCK_* constexprs, the other int constexprs (LAYOUT: 1 = n-contiguous, 2 =",
        "channels-last) and the boolean constexprs that are True. Launches that differ only in",
        "their int arguments share a compile unless Triton specialises them differently (an int",
        "equal to 1 becomes a constexpr, multiples of 16 get a divisibility hint); the last",
        "column shows the first launch recorded for each compile.",
        "",
        "## Worst case per kernel and arch",
        "",
        "| kernel | arch | max registers | max shared (B) | max stack / local / spill (B) | compiles |",
        "|---|---|---:|---:|---:|---:|",
    ]
    worst: dict = {}
    for row in report["results"]:
        if row["error"]:
            continue
        k = (row["kernel"], row["arch"])
        w = worst.setdefault(k, dict(regs=0, shared=0, spill=0, n=0))
        w["regs"] = max(w["regs"], row["regs"])
        w["shared"] = max(w["shared"], row["shared"])
        w["spill"] = max(w["spill"], row["stack"], row["local"], row["spill_stores"],
                         row["spill_loads"])
        w["n"] += 1
    for (kernel, arch), w in sorted(worst.items()):
        lines.append(f"| {kernel} | {arch} | {w['regs']} | {w['shared']} | {w['spill']} | {w['n']} |")
    lines += [
        "",
        "## Every compile",
        "",
        "| kernel | dtype | arch | config | regs | shared (B) | stack/local (B) | spill st/ld (B) "
        "| status | first launch: grid, int args |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in report["results"]:
        status = "; ".join(row["problems"]) or "ok"
        if status != "ok":
            status = f"**{status}**"
        ex = row["example"]
        first = (f"{ex['case'].rsplit(' ', 1)[0]}: grid {ex['grid']}, "
                 + " ".join(f"{k}={v}" for k, v in ex["ints"].items()))
        if row["error"]:
            nums = "- | - | - | -"
        else:
            nums = (f"{row['regs']} | {row['shared']} | {row['stack']}/{row['local']} | "
                    f"{row['spill_stores']}/{row['spill_loads']}")
        lines.append(f"| {row['kernel']} | {row['dtype']} | {row['arch']} | {row['config']} "
                     f"| {nums} | {status} | {first} |")
    lines += ["", "## Cases recorded", ""]
    lines += [f"- {c}" for c in report["cases"]]
    return "\n".join(lines) + "\n"


# =============================================================================== main
def run(jobs: int) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    import triton

    t0 = time.perf_counter()
    try:
        cuobjdump = cuobjdump_path()
    except Exception as e:
        raise FileNotFoundError(f"cuobjdump not found: {e}") from e
    if not (cuobjdump and os.path.isfile(cuobjdump) and os.access(cuobjdump, os.X_OK)):
        raise FileNotFoundError(f"cuobjdump not found or not executable: {cuobjdump!r}")
    if not callable(getattr(triton, "compile", None)):
        raise ImportError("triton.compile is missing")

    launches = record()
    expected = entry_kernels()
    seen = {f"{la.fn.__module__.rsplit('.', 1)[-1]}.{la.fn.__name__}" for la in launches}
    missing = sorted(set(expected) - seen)

    # specialise and deduplicate; remember which cases / dtypes use each compile
    jobs_by_key: dict[str, dict] = {}
    for la in launches:
        for cap in ARCHS:
            job = specialise(la, cap)
            key = job_key(job)
            job = jobs_by_key.setdefault(key, dict(job, key=key, cases=[]))
            if la.case not in job["cases"]:
                job["cases"].append(la.case)
    todo = list(jobs_by_key.values())
    ctx = multiprocessing.get_context("spawn")
    pickled = [{k: v for k, v in j.items() if k not in ("cases", "cx_named", "example")}
               for j in todo]
    t_spec = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(compile_job, pickled))
    else:
        results = [compile_job(j) for j in pickled]

    rows = []
    for job, r in zip(todo, results):
        dtypes = sorted({c.rsplit(" ", 1)[-1] for c in job["cases"]}, key=DTYPES.index)
        row = dict(r, kernel=job["name"], module=job["module"].rsplit(".", 1)[-1],
                   dtype="/".join(dtypes), cap=job["cap"],
                   arch=r.get("arch") or f"sm_{job['cap']}" + ("a" if job["cap"] >= 90 else ""),
                   config=_config(job), cases=job["cases"],
                   constexprs=job["cx_named"], signature=job["signature"],
                   example=job["example"])
        row["problems"] = _problems(row, job["cap"])
        rows.append(row)
    rows.sort(key=lambda r: (KERNEL_MODULES.index(r["module"]), r["kernel"],
                             DTYPES.index(r["dtype"].split("/")[0]), r["cap"], r["config"]))
    n_problems = sum(bool(r["problems"]) for r in rows) + len(missing)
    return dict(
        triton=triton.__version__, torch=torch.__version__, cuobjdump=cuobjdump,
        shared_limit={str(k): v for k, v in SHARED_LIMIT.items()},
        expected_kernels=sorted(expected), missing_kernels=missing,
        n_launches=len(launches), n_compiled=len(rows), n_problems=n_problems,
        cases=list(dict.fromkeys(la.case for la in launches)),
        seconds=dict(record_and_specialise=round(t_spec - t0, 1),
                     compile=round(time.perf_counter() - t_spec, 1),
                     total=round(time.perf_counter() - t0, 1)),
        results=rows, written_to=None,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the full report (JSON) here")
    ap.add_argument("--write", help="write the Markdown table here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="compile processes (default: 2)")
    args = ap.parse_args(argv)

    # compiled, not interpreted; a fresh cache (nothing reused across runs); Triton 3.9's
    # default FP fusion (on) made explicit, which only silences its warning
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cache = tempfile.mkdtemp(prefix="attnpool-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "0":
        print("triton was imported interpreted; run this as a script", file=sys.stderr)
        return 2
    try:
        try:
            report = run(args.jobs)
        except (FileNotFoundError, ImportError, AttributeError) as e:
            print(f"AOT check cannot run: {e}", file=sys.stderr)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(fatal=str(e)), f)
            return 2
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    if args.write:
        report["written_to"] = os.path.relpath(args.write)
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        with open(args.write, "w") as f:
            f.write(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)

    for row in report["results"]:
        if row["problems"]:
            print(f"FAIL {row['kernel']} {row['dtype']} {row['arch']} [{row['config']}]: "
                  f"{'; '.join(row['problems'])}" + (f"\n{row['error']}" if row["error"] else ""))
    for k in report["missing_kernels"]:
        print(f"FAIL {k}: launched in kernels/ but never recorded")
    worst = max(report["results"], key=lambda r: r.get("regs") or 0)
    print(f"{report['n_launches']} launches, {report['n_compiled']} compiles, "
          f"{report['n_problems']} problem(s), {report['seconds']['total']} s "
          f"(max registers {worst.get('regs')}: {worst['kernel']} {worst['dtype']} {worst['arch']})")
    return 1 if report["n_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
