"""Print README's CPU performance tables from benchmarks/results/cpu.csv, one per machine:
forward + backward (median ms) of eager, torch.compile and attnpool's cpp kernels at each
op's CPU shapes, one column group per CPU path measured (cpu-avx512, cpu-avx2, cpu-default).
With --cluster-floors, the attention-cluster sweep against its compute and memory floors.
With --gpu, the same for every GPU CSV at the GPU shapes: each mode's time and the peak
memory of eager, compile, Triton and CUDA, and each kernel backend's speedup.

    python benchmarks/table.py
    python benchmarks/table.py --gpu
    python benchmarks/table.py --cluster-floors --machine AMD --peak avx512=512,avx2=260 --bandwidth 12.2
"""

from __future__ import annotations

import csv
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention_cluster  # noqa: E402
import bench_attentional_pooling  # noqa: E402
import bench_pyramid_attention  # noqa: E402
import bench_st_regularizer  # noqa: E402
import bench_weighted_pool  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# each script and the CSV op names it writes
SCRIPTS = {bench_attention_cluster: ("attention_cluster",),
           bench_attentional_pooling: ("attentional_pooling",),
           bench_pyramid_attention: ("pyramid_attention",),
           bench_st_regularizer: ("st_regularizer",),
           bench_weighted_pool: ("weighted_pool",)}
DEVICES = ("cpu-avx512", "cpu-avx2", "cpu-default")


def is_cpu_shape(shape: str, sizes: tuple[int, ...]) -> bool:
    """Whether a CSV shape string names a script's CPU shape: its sizes, in order, are a
    subsequence of the script's arguments (the regulariser's shape leaves out the pool's C)."""
    rest = iter(sizes)
    return all(any(n == m for m in rest) for n in map(int, re.findall(r"\d+", shape)))


def cluster_floors(t: dict, peaks: dict[str, float], bandwidth: float) -> None:
    """FLOPs and bytes of the cluster's forward + backward (fc1 scoring) per swept shape, the
    floors FLOPs / peak and bytes / bandwidth (fp32; DRAM bandwidth, pessimistic for inputs that
    fit the L3), and the fraction of the larger one the cpp kernels reach.
    FLOPs: 6 products of 2·B·L·F·N each (forward: scores, pooling; backward: d attention,
    grad_x's two halves, grad_weight), what both compile's graph and the cpp kernels do
    (before the sixth session the cpp backward recomputed the pooling, a seventh). Bytes: x
    read twice, grad_x written, out written and read back, grad_out read."""
    print("| device | shape | GFLOP | MB | compute floor ms | memory floor ms | compile ms | cpp ms "
          "| cpp / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (op, shape, device, prov), ms in sorted(t.items()):
        if op != "attention_cluster" or prov != "attnpool-cpp" or device not in peaks:
            continue
        d = {k: int(v) for k, v in (i.split("=") for i in shape.split(","))}
        blfn = d["B"] * d["L"] * d["F"] * d["N"]
        flops = 12 * blfn
        mbytes = 4 * (3 * d["B"] * d["L"] * d["F"] + 3 * d["B"] * d["N"] * d["F"]) / 1e6
        compute, memory = flops / peaks[device] / 1e6, mbytes / (bandwidth * 1.073741824)  # ms
        comp = t.get((op, shape, device, "compile"))
        print(f"| {device} | {shape} | {flops / 1e9:.2f} | {mbytes:.0f} | {compute:.2f} | "
              f"{memory:.2f} | {'-' if comp is None else f'{comp:.2f}'} | {ms:.2f} | "
              f"{max(compute, memory) / ms:.2f} |")


GPU_PROVIDERS = ("eager", "compile", "attnpool-triton", "attnpool-cuda")


def gpu_tables() -> None:
    """Per GPU CSV: forward, backward and full p50 ms and full peak MiB per provider at the GPU
    shapes, and (full) the Triton and CUDA speedups over the better of eager and compile."""
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))):
        if os.path.basename(path) == "cpu.csv":
            continue
        v, meta = {}, ""
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                v[(r["op"], r["shape"], r["mode"], r["metric"], r["provider"])] = float(r["p50"])
                meta = f"{r['device']}, torch {r['torch']}, triton {r['triton']}"
        print(f"\n{os.path.basename(path)}: {meta}")
        print("| op | shape | mode | " + " | ".join(GPU_PROVIDERS) + " | triton × | cuda × |")
        print("|---|---|---|" + "---|" * (len(GPU_PROVIDERS) + 2))
        for mod, ops in SCRIPTS.items():
            for sizes in mod.SHAPES["cuda"]:
                shapes = sorted({(o, sh) for o, sh, *_ in v if o in ops and is_cpu_shape(sh, sizes)})
                for op, shape in shapes:
                    for mode, metric in (("forward", "time_ms"), ("backward", "time_ms"),
                                         ("full", "time_ms"), ("full", "peak_mb")):
                        cells = [v.get((op, shape, mode, metric, p)) for p in GPU_PROVIDERS]
                        base = [c for c in cells[:2] if c is not None]
                        ratio = ["" if c is None or not base or metric != "time_ms" else
                                 f"{min(base) / c:.2f}" for c in cells[2:]]
                        unit = "MiB" if metric == "peak_mb" else "ms"
                        print(f"| {op} | {shape} | {mode} {unit} | " + " | ".join(
                            "-" if c is None else f"{c:.4g}" for c in cells) + " | "
                            + " | ".join(ratio) + " |")


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cluster-floors", action="store_true")
    p.add_argument("--gpu", action="store_true", help="the GPU CSVs' tables")
    p.add_argument("--peak", default="avx512=512,avx2=260,default=130",
                   help="fp32 FMA peak per path, GFLOP/s, all threads (benchmarks/fma_peak.cpp)")
    p.add_argument("--bandwidth", type=float, default=12.2, help="copy bandwidth, GiB/s")
    p.add_argument("--machine", default="", help="only the CPUs whose model contains this "
                   "(the floors take one machine's --peak and --bandwidth)")
    args = p.parse_args()
    if args.gpu:
        gpu_tables()
        return
    # one table per machine (the CSV key holds it): CPUs differ in more than the ISA
    by_machine: dict[str, dict] = {}
    versions = {}
    with open(os.path.join(RESULTS, "cpu.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r["metric"] == "time_ms" and r["mode"] == "full":
                t = by_machine.setdefault(r.get("machine", ""), {})
                t[(r["op"], r["shape"], r["device"], r["provider"])] = float(r["p50"])
                versions[r.get("machine", "")] = r["torch"]
    peaks = {f"cpu-{k}": float(v) for k, v in (i.split("=") for i in args.peak.split(","))}
    for machine, t in by_machine.items():
        if args.machine not in machine:
            continue
        print(f"\n{machine}, torch {versions[machine]}")
        if args.cluster_floors:
            cluster_floors(t, peaks, args.bandwidth)
        else:
            cpu_table(t)


def cpu_table(t: dict) -> None:
    """README's CPU table of one machine: per op and CPU shape, eager / compile / cpp per path."""
    devices = [d for d in DEVICES if any(k[2] == d for k in t)]
    rows = []
    for mod, ops in SCRIPTS.items():
        for sizes in mod.SHAPES["cpu"]:
            for op, shape, _, _ in sorted(t):
                if op in ops and is_cpu_shape(shape, sizes) and (op, shape) not in rows:
                    rows.append((op, shape))
    print("| op | shape | " + " | ".join(f"{d}: eager / compile / cpp" for d in devices) + " |")
    print("|---|---|" + "---|" * len(devices))
    for op, shape in rows:
        cells = []
        for d in devices:
            e, c, k = (t.get((op, shape, d, p)) for p in ("eager", "compile", "attnpool-cpp"))
            if k is None or (e is None and c is None):
                cells.append("")
                continue
            base = min(v for v in (e, c) if v is not None)
            fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
            cells.append(f"{fmt(e)} / {fmt(c)} / **{fmt(k)}** ({base / k:.2f}×)")
        print(f"| {op} | {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
