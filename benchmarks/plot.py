"""Draw the plots of benchmarks/results/*.csv, per device (a GPU, or a CPU instruction set and
CPU model such as cpu-avx2_AMD_EPYC) and op:

* ``<device>_<op>.png``: time per provider for forward, backward and forward + backward at
  each shape that is not on a sweep;
* ``<device>_<op>_sweep.png``: forward + backward time against each swept size (shapes that
  differ in that size alone, at least three of them), one line per provider, log-log.

    python benchmarks/plot.py
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("forward", "backward", "full")


def parse(shape: str) -> dict[str, str]:
    """"B=8,L=25,F=1024" -> {"B": "8", ...} (sizes such as C=256/512 stay strings); H and W,
    which the sweeps change together, become one size H·W."""
    d = dict(item.split("=", 1) for item in shape.split(",") if "=" in item)
    if d.get("H", "").isdigit() and d.get("W", "").isdigit():
        d["H·W"] = str(int(d.pop("H")) * int(d.pop("W")))
    return d


def sweeps(shapes: list[str]) -> list[tuple[str, list[tuple[float, str]]]]:
    """(size name, [(value, shape)]) for every size that takes >= 3 values while the others
    stay fixed."""
    found = []
    parsed = {s: parse(s) for s in shapes}
    for key in sorted({k for p in parsed.values() for k in p}):
        groups = defaultdict(list)
        for s, p in parsed.items():
            if key in p and p[key].isdigit():
                rest = tuple(sorted((k, v) for k, v in p.items() if k != key))
                groups[rest].append((float(p[key]), s))
        found += [(key, sorted(g)) for g in groups.values() if len(g) >= 3]
    return found


def providers_of(times) -> list[str]:
    """Providers of (provider, mode) keys: the baselines first, then attnpool's."""
    return sorted({p for p, _ in times}, key=lambda p: (p.startswith("attnpool"), p))


def save(fig, device: str, out: str) -> None:
    fig.suptitle(device, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def bars(device: str, op: str, shapes: list[str], cell: dict, out: str) -> None:
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        times = cell[shape]
        providers = providers_of(times)
        width = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            ys = [times.get((prov, m), 0.0) for m in MODES]
            rects = ax.bar([j + i * width for j in range(len(MODES))], ys, width, label=prov)
            ax.bar_label(rects, fmt="%.2f", fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(MODES))], MODES)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op}\n{shape}", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, device, out)


def lines(device: str, op: str, groups, cell: dict, out: str) -> None:
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (key, points) in zip(axes[0], groups):
        providers = providers_of({key for _, s in points for key in cell[s]})
        for prov in providers:
            xy = [(v, cell[s][(prov, "full")]) for v, s in points if (prov, "full") in cell[s]]
            ax.plot(*zip(*xy), marker="o", label=prov)
        fixed = ",".join(f"{k}={v}" for k, v in parse(points[0][1]).items() if k != key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("forward + backward, ms (median)")
        ax.set_title(f"{op}: {key} swept\n{fixed}", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, device, out)


def name_of(device: str, machine: str) -> str:
    """A GPU's name, or ``cpu-<isa>_<CPU model>`` (one CSV holds every CPU: the ISA and the
    model tell its row sets apart), with spaces as underscores."""
    if device.startswith("cpu-"):
        model = re.sub(r"\((R|TM)\)", "", machine.split(",")[0])
        device = f"{device}_{model}"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_")


def main() -> None:
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))):
        # (device, machine, op) -> shape -> {(prov, mode): ms}
        cells = defaultdict(lambda: defaultdict(dict))
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["metric"] == "time_ms":
                    cells[(r["device"], r.get("machine", ""), r["op"])][r["shape"]][
                        (r["provider"], r["mode"])] = float(r["p50"])
        for (device, machine, op), cell in sorted(cells.items()):
            name = name_of(device, machine)
            device = f"{device}, {machine}" if device.startswith("cpu-") else device
            stem = os.path.join(RESULTS, f"{name}_{op}")
            groups = sweeps(list(cell))
            on_sweep = {s for _, points in groups for _, s in points}
            alone = sorted(s for s in cell if s not in on_sweep)
            if alone:
                bars(device, op, alone, cell, stem + ".png")
                print("wrote", stem + ".png")
            if groups:
                lines(device, op, groups, cell, stem + "_sweep.png")
                print("wrote", stem + "_sweep.png")


if __name__ == "__main__":
    main()
