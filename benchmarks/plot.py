"""Draw one PNG per (device, op) from benchmarks/results/*.csv: time per provider
for forward, backward and forward + backward at each shape.

    python benchmarks/plot.py
"""

from __future__ import annotations

import csv
import glob
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("forward", "backward", "full")


def main() -> None:
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))):
        table = defaultdict(dict)  # (op, shape) -> {(provider, mode): p50}
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["metric"] == "time_ms":
                    table[(r["op"], r["shape"])][(r["provider"], r["mode"])] = float(r["p50"])
                    device = r["device"]
        by_op = defaultdict(list)
        for op, shape in table:
            by_op[op].append(shape)
        for op, shapes in by_op.items():
            fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
            for ax, shape in zip(axes[0], sorted(shapes)):
                cell = table[(op, shape)]
                providers = sorted({p for p, _ in cell}, key=lambda p: (p.startswith("attnpool"), p))
                width = 0.8 / len(providers)
                for i, prov in enumerate(providers):
                    ys = [cell.get((prov, m), 0.0) for m in MODES]
                    xs = [j + i * width for j in range(len(MODES))]
                    bars = ax.bar(xs, ys, width, label=prov)
                    ax.bar_label(bars, fmt="%.2f", fontsize=7)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(MODES))], MODES)
                ax.set_ylabel("ms (median)")
                ax.set_title(f"{op}\n{shape}", fontsize=9)
                ax.legend(fontsize=7)
            fig.suptitle(f"{device}", fontsize=10)
            fig.tight_layout()
            out = os.path.join(RESULTS, f"{os.path.basename(path)[:-4]}_{op}.png")
            fig.savefig(out, dpi=110)
            plt.close(fig)
            print("wrote", out)


if __name__ == "__main__":
    main()
