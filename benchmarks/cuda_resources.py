"""Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no GPU needed) and report
each kernel's resources from `ptxas -v`: registers, shared memory, stack, spills.

    python benchmarks/cuda_resources.py [--nvcc PATH] [--archs 80,90] [--write PATH]

Exits 1 on a compile error or on a spill above MAX_SPILL_BYTES. CI runs it; `--write` puts
the Markdown table in a file (benchmarks/results/cuda_resources.md).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Spill stores up to this many bytes per thread are accepted and listed (benchmarks/NOTES.md says
# why): the kernels' __launch_bounds__ cap their registers (64 at 1024 threads per block,
# for instance), and at the cap ptxas keeps a few words of loop state on the stack, in L1.
# Whether a higher cap (fewer resident blocks) beats that is a question for a GPU. Anything
# larger is a regression and fails.
MAX_SPILL_BYTES = 64

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def find_nvcc(given: str | None) -> str:
    for cand in (given, shutil.which("nvcc"), *sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))):
        if cand and os.path.exists(cand):
            return cand
    sys.exit("nvcc not found: cannot compile the CUDA sources")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    """void attnpool::ns::(anonymous namespace)::kernel<float, 4, false>(float const*, ...)
    -> kernel<float, 4, false>"""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)", "anon").split("(")[0]
    head = name.split("<")[0].split("::")[-1]
    args = name[len(name.split("<")[0]):]
    return (head + args).replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def compile_all(nvcc: str, archs: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            for arch in archs:
                cmd = [nvcc, "-c", "-O3", "-I" + os.path.join(ROOT, "csrc"), f"-arch=sm_{arch}",
                       "-Xptxas", "-v", cu, "-o", os.path.join(tmp, f"{arch}.o")]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"nvcc failed on {cu} sm_{arch}:\n{run.stderr}")
                current = None
                for line in run.stderr.splitlines():
                    if (m := ENTRY.search(line)):
                        current = {"file": os.path.basename(cu), "arch": arch,
                                   "mangled": m.group(1)}
                        rows.append(current)
                    elif current is not None and (m := PROPS.search(line)):
                        current.update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                                       spill_ld=int(m.group(3)))
                    elif current is not None and (m := USED.search(line)):
                        current.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
                print(f"  ok {os.path.relpath(cu, ROOT)} sm_{arch}", flush=True)
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = short(name)
    return rows


def check(rows: list[dict]) -> list[str]:
    return [f"{r['kernel']} sm_{r['arch']}: {r['spill_st']} bytes spill stores"
            for r in rows if r.get("spill_st", 0) > MAX_SPILL_BYTES]


def table(rows: list[dict]) -> str:
    lines = ["| file | kernel | arch | registers | static smem (B) | stack (B) | spill st / ld (B) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | `{r['kernel']}` | sm_{r['arch']} | {r.get('regs', '?')} | "
                     f"{r.get('smem', 0)} | {r.get('stack', 0)} | "
                     f"{r.get('spill_st', 0)} / {r.get('spill_ld', 0)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nvcc")
    p.add_argument("--archs", default="80,90")
    p.add_argument("--write")
    args = p.parse_args()
    nvcc = find_nvcc(args.nvcc)
    rows = compile_all(nvcc, args.archs.split(","))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", version)
    text = (f"CUDA kernels' resources from `ptxas -v` (nvcc {release.group(1) if release else '?'},"
            f" `python benchmarks/cuda_resources.py`). Dynamic shared memory is set by the "
            "launchers and not included.\n\n" + table(rows))
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    spills = [r for r in rows if r.get("spill_st", 0) or r.get("spill_ld", 0)]
    print(f"{len(rows)} kernels compiled; {len(spills)} with spills")
    for r in spills:
        print(f"  spill: {r['kernel']} sm_{r['arch']}: {r['spill_st']} B stores, "
              f"{r['spill_ld']} B loads, {r.get('regs')} registers")
    problems = check(rows)
    for msg in problems:
        print(f"SPILL ABOVE {MAX_SPILL_BYTES} BYTES: {msg}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
