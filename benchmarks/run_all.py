"""Run every op's benchmark on one device, then draw the plots.

    python benchmarks/run_all.py [--device cpu|cuda] [--sweep]
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    rc = 0
    for script in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        print(f"== {os.path.basename(script)}", flush=True)
        rc |= subprocess.call([sys.executable, script, *sys.argv[1:]])
    rc |= subprocess.call([sys.executable, os.path.join(HERE, "plot.py")])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
