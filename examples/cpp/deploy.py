"""Deploy a video head that uses attnpool without Python: torch.export with dynamic batch and
clip length, an AOTInductor package, and a C++ program (run_package.cpp) that loads
attnpool's compiled library and the package and runs it.

    python examples/cpp/deploy.py [--out DIR] [--device cpu|cuda]

Writes DIR/model.pt2, DIR/inputs.pt and DIR/expected.pt (the module's outputs on inputs of
another batch size and length than the export's), builds run_package with CMake against
the installed torch's libtorch, runs it and compares its outputs with the module's: exit
status 1 if they differ. Needs attnpool built by setup.py (`pip install .`), CMake and a
C++ compiler.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn
from torch.export import Dim

import attnpool
from attnpool import backends

HERE = os.path.dirname(os.path.abspath(__file__))


class VideoHead(nn.Module):
    """Clip features [B, T, C, H, W] -> class scores [B, K], through three attnpool ops:
    spatio-temporal attention (masked frame means), attention clusters over the frames, and
    attentional pooling of the maps."""

    def __init__(self, channels: int = 32, classes: int = 10, units: int = 4):
        super().__init__()
        self.st = attnpool.SpatioTemporalAttention(channels, (16, 8))
        self.cluster = attnpool.AttentionCluster(channels, units)
        self.attentional = attnpool.AttentionalPooling(channels, classes, rank=2)
        self.fc = nn.Linear(channels + units * channels, classes)

    def forward(self, x):
        frames = x.mean(dim=(-2, -1))
        features = torch.cat([self.st(x), self.cluster(frames)], dim=-1)
        return self.fc(features) + self.attentional(x)


def export_package(out: str, device: str) -> tuple[str, list, list]:
    """The package, and inputs / expected outputs of other sizes than the export's."""
    torch.manual_seed(0)
    model = VideoHead().eval().to(device)
    example = torch.randn(2, 6, 32, 7, 7, device=device)
    dims = {0: Dim("batch", min=1, max=256), 1: Dim("frames", min=3, max=512)}
    # the device's compiled kernels: on a GPU "auto" may pick Triton (the attention cluster),
    # whose ops are registered from Python and so cannot run in a C++ program
    with attnpool.use_backend("cpp" if device == "cpu" else "cuda"), torch.no_grad():
        exported = torch.export.export(model, (example,), dynamic_shapes=({**dims},))
    ops = sorted({str(n.target) for n in exported.graph.nodes
                  if str(n.target).startswith("attnpool.")})
    print("exported; attnpool ops in the graph:", ", ".join(ops))
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=os.path.join(out, "model.pt2"))
    inputs = [torch.randn(5, 9, 32, 7, 7, device=device)]
    with attnpool.use_backend("reference"), torch.no_grad():  # the plain-PyTorch math
        expected = [model(*inputs)]
    return package, inputs, expected


def build_program(out: str) -> str:
    build = os.path.join(out, "build")
    subprocess.run(["cmake", "-S", HERE, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    return os.path.join(build, "run_package")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--device", default="cpu", help="cpu (cpp kernels) or cuda (cuda kernels)")
    args = p.parse_args()
    ext = backends.extension()
    if ext is None or not ext.__name__ == "attnpool._C":
        print(f"needs attnpool._C built by setup.py (pip install .): {backends.extension_error()}")
        return 1
    out = args.out or tempfile.mkdtemp(prefix="attnpool-deploy-")
    os.makedirs(out, exist_ok=True)
    package, inputs, expected = export_package(out, args.device)
    torch.save([t.cpu() for t in inputs], os.path.join(out, "inputs.pt"))
    torch.save([t.cpu() for t in expected], os.path.join(out, "expected.pt"))
    program = build_program(out)
    outputs_path = os.path.join(out, "outputs.pt")
    subprocess.run([program, ext.__file__, package, os.path.join(out, "inputs.pt"), outputs_path,
                    args.device], check=True)
    outputs = torch.load(outputs_path)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-5)
    print(f"ok: the C++ program's outputs equal the module's ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
