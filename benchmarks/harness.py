"""The one benchmark harness: timing, peak memory, and the results CSV.

A benchmark script describes, per provider, a callable that builds its inputs and
returns ``(forward, backward)`` closures; ``measure`` times one op's providers in
forward, backward and forward + backward, interleaved round by round, and (on CUDA) their
peak memory, and ``write_rows`` merges the rows into ``benchmarks/results/<device>.csv``.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch._functorch.config

# Inductor's cache key misses ATEN_CPU_CAPABILITY: a kernel cached for another capability is
# reused (and gave garbage or crashed here). Each capability then gets its own cache.
if os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(),
        f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

# On a CPU with AVX-512, ATEN_CPU_CAPABILITY=avx2|default moves torch's and attnpool's own
# kernels to the lower instruction set, but not MKL's and oneDNN's GEMMs, which eager and
# compile call: on an Intel CPU they would go on running AVX-512 (sgemm 1536^3 on one thread
# here: 155 GFLOP/s, against 99 with AVX2). They are held to the same set, as on a CPU without
# AVX-512. (MKL reads the variable on its first call, after torch's import.)
_MKL_ISA = {"avx2": ("AVX2", "AVX2"), "default": ("SSE4_2", "SSE41")}
if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in _MKL_ISA:
    _mkl, _onednn = _MKL_ISA[os.environ["ATEN_CPU_CAPABILITY"].lower()]
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", _mkl)
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _onednn)

# backward() reruns on one graph (retain_graph) so that forward and backward are timed
# apart; compiled graphs must then keep their saved buffers.
torch._functorch.config.donated_buffer = False

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["op", "provider", "mode", "metric", "shape", "p50", "p20", "p80", "device", "machine",
           "torch", "triton", "commit"]
KEY = ("op", "provider", "mode", "metric", "shape", "device", "machine")


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu-<isa>`` with the instruction set torch's kernels and ours run
    (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2|default`` selects
    a lower one on a bigger CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"


def machine_name(device: torch.device) -> str:
    """What ran it: the GPU, or the CPU's model name and the number of threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def results_path(device: torch.device) -> str:
    """One CSV per device type for the CPU (the ISAs are rows), one per GPU model."""
    name = "cpu" if device.type == "cpu" else device_name(device).replace(" ", "_")
    return os.path.join(RESULTS, name + ".csv")


def _versions() -> tuple[str, str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(RESULTS)).stdout.strip()
    except OSError:
        commit = ""
    return torch.__version__, triton_version, commit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn: Callable[[], object]) -> float:
    """One call of ``fn`` on the wall clock (CPU)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: list[Callable[[], object]], device: torch.device, *, warmup: int = 3,
                     rep: int = 20, min_time_s: float = 0.5) -> list[tuple[float, float, float]]:
    """(p50, p20, p80) milliseconds of each of ``fns`` after warm-up. The calls are taken in
    rounds, one call of each fn per round, so that a slow spell of a shared machine lands on
    every fn alike instead of on whichever happened to be timed then. On a GPU each call is
    timed as ``triton.testing.do_bench`` does (_gpu_rounds)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    if device.type == "cuda":
        samples = _gpu_rounds(fns, device, rep, min_time_s)
    else:
        samples = [[] for _ in fns]
        start = time.perf_counter()
        while len(samples[0]) < rep or (time.perf_counter() - start < min_time_s * len(fns)
                                        and len(samples[0]) < 1000):
            for fn, out in zip(fns, samples):
                out.append(_elapsed_ms(fn))
    stats = []
    for out in samples:
        q = statistics.quantiles(out, n=10)
        stats.append((statistics.median(out), q[1], q[7]))
    return stats


def _gpu_rounds(fns: list[Callable[[], object]], device: torch.device, rep: int,
                min_time_s: float) -> list[list[float]]:
    """GPU time of each call between two events, with the L2 cache flushed before it (a
    256 MiB write; the H200's L2 is 60 MB) and no synchronisation between calls: the host runs
    ahead while the flush runs, so a call's own launch overhead is hidden up to the flush's
    time, and a host-bound call (many small launches) shows its gaps, as in do_bench."""
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device)
    events: list[list[tuple]] = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < rep or (time.perf_counter() - start < min_time_s * len(fns) and rounds < 500):
        for fn, out in zip(fns, events):
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            out.append((begin, end))
        rounds += 1
        if rounds % 10 == 0:  # keep the queue short and the host clock meaningful
            _sync(device)
    _sync(device)
    return [[b.elapsed_time(e) for b, e in out] for out in events]


def copy_bandwidth_gbs(device: torch.device, mib: int = 1024) -> float:
    """Device memory bandwidth as a large device-to-device copy moves it: (bytes read + bytes
    written) / p50 time, in GB/s. The measured ceiling for the memory floors."""
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    p50 = time_ms(lambda: dst.copy_(src), device, min_time_s=0.3)[0]
    return 2 * src.numel() * src.element_size() / (p50 * 1e-3) / 1e9


def time_ms(fn: Callable[[], object], device: torch.device, **kwargs) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn`` after warm-up."""
    return time_interleaved([fn], device, **kwargs)[0]


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by ``fn`` beyond what was live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def compiled(fn: Callable) -> Callable:
    """The compile provider: ``torch.compile`` specialised to each shape (``dynamic=False``),
    its best case; a sweep would otherwise recompile with dynamic shapes after the second
    size (which is slower, and crashed inductor's lowering of the pyramid's pooling)."""
    return torch.compile(fn, dynamic=False)


@dataclass
class Case:
    """One provider at one shape: ``setup()`` returns (forward, backward) closures;
    backward reuses the graph of the latest forward (retain_graph)."""

    op: str
    provider: str
    shape: str
    setup: Callable[[], tuple[Callable[[], object], Callable[[], object]]]


def measure(cases: list[Case], device: torch.device,
            modes: Iterable[str] = ("forward", "backward", "full")) -> list[dict]:
    """Time every case in every mode, the cases interleaved (time_interleaved); on CUDA also
    the peak memory of each."""
    closures = []
    for case in cases:
        forward, backward = case.setup()
        forward()  # a graph for the first timed backward
        closures.append({"forward": forward, "backward": backward,
                         "full": lambda f=forward, b=backward: (f(), b())})
    rows = []
    for mode in modes:
        fns = [c[mode] for c in closures]
        for case, fn, (p50, p20, p80) in zip(cases, fns, time_interleaved(fns, device)):
            rows.append(_row(case, mode, "time_ms", p50, p20, p80, device))
            mem = peak_mb(fn, device)
            if mem is not None:
                rows.append(_row(case, mode, "peak_mb", mem, mem, mem, device))
    return rows


def _row(case: Case, mode: str, metric: str, p50: float, p20: float, p80: float,
         device: torch.device) -> dict:
    torch_v, triton_v, commit = _versions()
    return {"op": case.op, "provider": case.provider, "mode": mode, "metric": metric,
            "shape": case.shape, "p50": f"{p50:.4f}", "p20": f"{p20:.4f}", "p80": f"{p80:.4f}",
            "device": device_name(device), "machine": machine_name(device), "torch": torch_v,
            "triton": triton_v, "commit": commit}


def write_rows(rows: list[dict], device: torch.device) -> str:
    """Merge ``rows`` into the device's CSV (a new row replaces one with the same key)."""
    path = results_path(device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    merged: dict[tuple, dict] = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                merged[tuple(r[k] for k in KEY)] = r
    for r in rows:
        merged[tuple(r[k] for k in KEY)] = r
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        w.writeheader()
        w.writerows(sorted(merged.values(), key=lambda r: tuple(r[k] for k in KEY)))
    return path


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['op']:<20} {r['provider']:<16} {r['mode']:<8} {r['metric']:<8} "
              f"{r['shape']:<28} p50={float(r['p50']):9.3f}  [{float(r['p20']):.3f}, "
              f"{float(r['p80']):.3f}]", flush=True)


def speedups(rows: list[dict], ours: str) -> list[str]:
    """Lines 'shape mode: ours is X× the better of eager and compile'."""
    t = {(r["shape"], r["mode"], r["provider"]): float(r["p50"]) for r in rows
         if r["metric"] == "time_ms"}
    lines = []
    for shape, mode, provider in sorted(t):
        if provider != ours:
            continue
        base = [t[(shape, mode, p)] for p in ("eager", "compile") if (shape, mode, p) in t]
        if base:
            lines.append(f"{shape} {mode}: {ours} {t[(shape, mode, ours)]:.3f} ms, "
                         f"{min(base) / t[(shape, mode, ours)]:.2f}x the better of eager/compile")
    return lines


def kernel_backends(op: str, device: str, dtype: torch.dtype) -> list[str]:
    """The attnpool kernel backends to time for ``op`` here: those available, except
    Triton on the CPU (its interpreter is a test vehicle, not a provider)."""
    import attnpool

    reasons = attnpool.available(op, torch.device(device), dtype)
    return [b for b in ("cpp", "cuda", "triton")
            if reasons[b] is None and not (device == "cpu" and b == "triton")]


def call_setup(make_fn: Callable[[], Callable], inputs: torch.Tensor | tuple[torch.Tensor, ...],
               grads: torch.Tensor | tuple[torch.Tensor, ...]) -> Callable:
    """A Case.setup that runs ``make_fn()(*inputs)`` and backpropagates ``grads`` into the
    inputs and the parameters (fresh leaf inputs per provider: providers never share graphs)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    grads = grads if isinstance(grads, tuple) else (grads,)

    def setup():
        fn = make_fn()
        leaves = [t.clone().requires_grad_() for t in inputs]
        state = {}

        def forward():
            out = fn(*leaves)
            state["out"] = out if isinstance(out, tuple) else (out,)

        def backward():
            for leaf in leaves:  # as after optimizer.zero_grad(): a fresh .grad, no accumulation
                leaf.grad = None
            torch.autograd.backward(state["out"][:len(grads)], grads, retain_graph=True)

        return forward, backward
    return setup


def stream_floor_ms(x: torch.Tensor) -> dict[str, float]:
    """Plain-torch probes of the memory floor of an op that streams ``x``: read it once
    (``x.sum()``, a forward), and read it while writing a fresh tensor of its size (``x * 2``,
    a backward that reads x and writes grad_x, allocation included). p50 milliseconds."""
    device = x.device
    read = time_ms(lambda: x.sum(), device)[0]
    read_write = time_ms(lambda: x * 2, device)[0]
    return {"read": read, "read+write": read_write, "op (read, then read+write)": read + read_write}


def _check_install() -> None:
    """Say which attnpool is timed: the scripts import the installed package, and a
    non-editable install does not follow the checkout's rebuilds."""
    import attnpool

    here = os.path.dirname(os.path.abspath(attnpool.__file__))
    print(f"# attnpool from {here}", flush=True)
    if os.path.dirname(here) != os.path.dirname(os.path.dirname(RESULTS)):
        print("# WARNING: not this checkout's attnpool; for the checkout's kernels run "
              "`pip install --no-build-isolation --no-deps -e .`", flush=True)


def cli(doc: str, shapes: dict[str, list[tuple[int, ...]]], sweep: dict[str, list[tuple[int, ...]]],
        cases: Callable[..., Iterable[Case]],
        floors: Callable[..., dict[str, float]] | None = None) -> None:
    """The command line every benchmark script shares: pick device, dtype and shapes,
    measure every case, print rows and speedups, merge the rows into the CSV. ``floors``
    (same arguments as ``cases``), if given, prints memory-floor probes per shape."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sweep", action="store_true", help="also the sweeps around the default shape")
    p.add_argument("--shape", help="comma-separated sizes instead of the defaults")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch the CSV")
    p.add_argument("--providers", help="comma-separated providers to time (default: all), e.g. "
                   "eager,compile,attnpool-triton")
    args = p.parse_args()
    _check_install()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":  # the ceiling of every memory floor, measured in the same run
        print(f"# copy bandwidth {copy_bandwidth_gbs(device):.0f} GB/s (read + write, 1 GiB)",
              flush=True)
    chosen = [tuple(map(int, args.shape.split(",")))] if args.shape else \
        shapes[device.type] + (sweep[device.type] if args.sweep else [])
    rows = []
    for s in chosen:
        if floors is not None:
            probes = floors(*s, args.device, dtype)
            print(f"floor probes {s}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in probes.items()),
                  flush=True)
        by_op: dict[str, list[Case]] = {}
        for case in cases(*s, args.device, dtype):
            if args.providers and case.provider not in args.providers.split(","):
                continue
            by_op.setdefault(case.op, []).append(case)
        for op_cases in by_op.values():  # one op's providers are timed against each other
            new = measure(op_cases, device)
            print_rows(new)
            rows += new
    for ours in ("attnpool-cpp",) if device.type == "cpu" else ("attnpool-cuda", "attnpool-triton"):
        for line in speedups(rows, ours):
            print(line)
    if not args.no_write:
        print("wrote", write_rows(rows, device))
