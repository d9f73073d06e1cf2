"""Print README's CPU performance table from benchmarks/results/cpu.csv: forward + backward
(median ms) of eager, torch.compile and attnpool's cpp kernels at each op's CPU shapes, one
column group per CPU path measured (cpu-avx512, cpu-avx2, cpu-default), and the machine.

    python benchmarks/table.py
"""

from __future__ import annotations

import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention_cluster  # noqa: E402
import bench_attentional_pooling  # noqa: E402
import bench_pyramid_attention  # noqa: E402
import bench_spatiotemporal  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# each script and the CSV op names it writes
SCRIPTS = {bench_attention_cluster: ("attention_cluster",),
           bench_attentional_pooling: ("attentional_pooling",),
           bench_pyramid_attention: ("pyramid_attention",),
           bench_spatiotemporal: ("st_regularizer", "temporal_attention_pool")}
DEVICES = ("cpu-avx512", "cpu-avx2", "cpu-default")


def is_cpu_shape(shape: str, sizes: tuple[int, ...]) -> bool:
    """Whether a CSV shape string names a script's CPU shape: its sizes are among the
    script's arguments (the regulariser's shape leaves out the pool's C)."""
    left = list(sizes)
    for n in map(int, re.findall(r"\d+", shape)):
        if n not in left:
            return False
        left.remove(n)
    return True


def main() -> None:
    t, machine = {}, {}
    with open(os.path.join(RESULTS, "cpu.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r["metric"] == "time_ms" and r["mode"] == "full":
                t[(r["op"], r["shape"], r["device"], r["provider"])] = float(r["p50"])
                machine[r["device"]] = f"{r.get('machine', '')}, torch {r['torch']}"
    devices = [d for d in DEVICES if d in machine]
    rows = []
    for mod, ops in SCRIPTS.items():
        for sizes in mod.SHAPES["cpu"]:
            rows += [(op, shape) for op, shape, _, _ in sorted(t)
                     if op in ops and is_cpu_shape(shape, sizes) and (op, shape) not in rows]
    print("| op | shape | " + " | ".join(f"{d}: eager / compile / cpp" for d in devices) + " |")
    print("|---|---|" + "---|" * len(devices))
    for op, shape in rows:
        cells = []
        for d in devices:
            e, c, k = (t.get((op, shape, d, p)) for p in ("eager", "compile", "attnpool-cpp"))
            if k is None:
                cells.append("")
                continue
            base = min(v for v in (e, c) if v is not None)
            fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
            cells.append(f"{fmt(e)} / {fmt(c)} / **{fmt(k)}** ({base / k:.2f}×)")
        print(f"| {op} | {shape} | " + " | ".join(cells) + " |")
    for d in devices:
        print(f"\n{d}: {machine[d]}")


if __name__ == "__main__":
    main()
