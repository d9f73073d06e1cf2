"""Every Triton kernel compiled ahead of time for sm_80 and sm_90a at the launch configurations
the launchers really pick (tests/aot_triton.py); no GPU needed, 2-3 minutes on 2 cores.

Fails (never skips) on a compile error, spills / local memory above MAX_SPILL_BYTES per
thread (smaller ones are listed in the table), shared memory over
the chip's per-block limit, a launched kernel the recorder never saw, or a missing
cuobjdump / triton.compile. The script runs in a subprocess with TRITON_INTERPRET=0 (this
suite runs Triton interpreted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from aot_triton import MAX_SPILL_BYTES, SHARED_LIMIT

pytestmark = pytest.mark.aot

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_triton.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("TRITON_CACHE_DIR", None)  # the script compiles into a fresh cache of its own
    res = subprocess.run([sys.executable, SCRIPT, "--json", str(out), "--jobs", "2"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode in (0, 1) and out.exists(), \
        f"the AOT script could not run (exit {res.returncode}):\n{res.stdout}\n{res.stderr[-6000:]}"
    rep = json.loads(out.read_text())
    rep["stdout"] = res.stdout
    rep["returncode"] = res.returncode
    return rep


def _rows(report, cond):
    return [f"{r['kernel']} {r['dtype']} {r['arch']} [{r['config']}] ({r['cases'][0]}): "
            + "; ".join(r["problems"]) for r in report["results"] if cond(r)]


def test_every_launched_kernel_compiled(report):
    assert report["n_compiled"] > 0
    assert not report["missing_kernels"], "launched in kernels/ but never recorded"
    compiled = {f"{r['module']}.{r['kernel']}" for r in report["results"]}
    assert set(report["expected_kernels"]) <= compiled
    archs = {r["arch"] for r in report["results"]}
    assert archs == {"sm_80", "sm_90a"}, archs


def test_no_compile_errors(report):
    bad = [f"{r['kernel']} {r['dtype']} {r['arch']} [{r['config']}]:\n{r['error']}"
           for r in report["results"] if r["error"]]
    assert not bad, "\n\n".join(bad)


def test_spills_within_the_accepted_bound(report):
    bad = _rows(report, lambda r: not r["error"] and max(
        r["local"], r["stack"], r["spill_stores"]) > MAX_SPILL_BYTES)
    assert not bad, f"spills / local memory above {MAX_SPILL_BYTES} B:\n" + "\n".join(bad)


def test_shared_memory_within_limit(report):
    bad = _rows(report, lambda r: not r["error"] and r["shared"] > SHARED_LIMIT[r["cap"]])
    assert not bad, "shared memory over the per-block limit:\n" + "\n".join(bad)


def test_script_verdict(report):
    # the script's own exit status agrees with the checks above (and covers anything else)
    assert report["returncode"] == 0 and report["n_problems"] == 0, report["stdout"][-6000:]
