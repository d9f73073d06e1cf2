"""End-to-end: train a video-classification head on clip features, with the reference
modules and with the fused ones, from the same seed; and an average-pooling baseline.

    python examples/train_video_head.py [--steps 300] [--out examples/results]

The data is generated here: each clip is T frames of C×H×W features of noise; its label
shows up only in a few frames (a class prototype added to one 2x2 patch of 2 of the T
frames). So pooling that attends to where and when wins over averaging everything.

The attention model: spatio-temporal attention (mask network + temporal softmax, trained
with its regulariser) and attention clusters over the frame features, concatenated, then a
Linear classifier. `attnpool.swap` turns the reference model into the fused one in place.
Writes `<out>/curves.png` and `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import attnpool
from attnpool import reference

B, T, C, H, W, K = 32, 16, 128, 7, 7, 6


def make_batch(g: torch.Generator, prototypes: torch.Tensor):
    x = torch.randn(B, T, C, H, W, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    for b in range(B):
        frames = torch.randperm(T, generator=g)[:2]
        i, j = torch.randint(0, H - 1, (2,), generator=g).tolist()
        x[b, frames, :, i:i + 2, j:j + 2] += prototypes[y[b]][:, None, None]
    return x, y


class AttentionHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.st = reference.SpatioTemporalAttention(C, (8, 8), tv_weight=1e-3,
                                                    contrast_weight=1e-3, unimodal_weight=0.1)
        self.cluster = reference.AttentionCluster(C, 4)
        self.fc = nn.Linear(C + 4 * C, K)

    def forward(self, x):
        pooled, mask, w = self.st(x, return_attention=True)
        clustered = self.cluster(x.mean((-2, -1)))
        logits = self.fc(torch.cat([pooled, clustered], dim=1))
        return logits, self.st.regularizer(mask, w)


class AverageHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, K)

    def forward(self, x):
        return self.fc(x.mean((1, 3, 4))), x.new_zeros(())


def train(model: nn.Module, steps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prototypes = 0.6 * torch.randn(K, C, generator=torch.Generator().manual_seed(123))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, elapsed = [], 0.0
    model.train()
    for _ in range(steps):
        x, y = make_batch(g, prototypes)
        t0 = time.perf_counter()
        logits, reg = model(x)
        loss = F.cross_entropy(logits, y) + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - t0
        losses.append(loss.item())
    model.eval()
    correct = 0
    eval_g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for _ in range(20):
            x, y = make_batch(eval_g, prototypes)
            correct += (model(x)[0].argmax(1) == y).sum().item()
    return {"losses": losses, "ms_per_step": 1e3 * elapsed / steps,
            "accuracy": correct / (20 * B)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    args = p.parse_args()

    torch.manual_seed(args.seed)
    ref_model = AttentionHead()
    fused_model = copy.deepcopy(ref_model)
    replaced = attnpool.swap(fused_model)
    torch.manual_seed(args.seed)
    runs = {
        "reference": train(ref_model, args.steps, args.seed),
        "fused": train(fused_model, args.steps, args.seed),
        "average pooling": train(AverageHead(), args.steps, args.seed),
    }
    # per-step |loss difference|: fp32 rounding differences, amplified step by step by the
    # optimisation (the two runs see the same data and start from the same weights)
    diffs = [abs(a - b) for a, b in zip(runs["reference"]["losses"], runs["fused"]["losses"])]
    summary = {
        "steps": args.steps, "batch": [B, T, C, H, W], "classes": K,
        "swapped": sorted(replaced),
        "max_loss_difference_first_10_steps": max(diffs[:10]),
        "max_loss_difference_first_50_steps": max(diffs[:50]),
        "max_loss_difference_all_steps": max(diffs),
        **{name: {k: v for k, v in r.items() if k != "losses"} | {"final_loss": r["losses"][-1]}
           for name, r in runs.items()},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))

    try:  # the plot is optional: `pip install matplotlib` (or the `examples` extra)
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot(r["losses"], label=f"{name} ({r['ms_per_step']:.1f} ms/step, "
                                   f"acc {100 * r['accuracy']:.0f}%)", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("video head on synthetic clips (label in 2 of 16 frames)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)


if __name__ == "__main__":
    main()
