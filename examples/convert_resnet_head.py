"""Convert the avgpool + fc head of a (small, ResNet-style) video classifier into an
attentional-pooling head with identical logits, then fine-tune the attention.

    python examples/convert_resnet_head.py [--steps 100]

The backbone runs per frame; the original head averages over frames and positions and
applies a Linear. `attnpool.swap.attentional_head_from_linear` builds an
`attnpool.AttentionalPooling` whose bottom-up map is the constant 1 and whose top-down
weights are the Linear's, so right after the conversion the model computes exactly
what it did; fine-tuning then lets the bottom-up map learn where to look.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import attnpool

T, K = 8, 5


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class VideoResNet(nn.Module):
    """A tiny ResNet applied per frame; head = average over frames and positions + fc."""

    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, K)
        self.head = None  # set by convert()

    def features(self, clip):  # [B, T, 3, H, W] -> [B, T, C, h, w]
        B, Tn = clip.shape[:2]
        f = self.layers(self.stem(clip.flatten(0, 1)))
        return f.reshape(B, Tn, *f.shape[1:])

    def forward(self, clip):
        f = self.features(clip)
        if self.head is not None:
            return self.head(f)
        return self.fc(f.mean((1, 3, 4)))

    def convert(self):
        self.head = attnpool.swap.attentional_head_from_linear(self.fc)


def make_batch(g, B=16):
    """The label is a colour blob placed at a random position in a few frames."""
    clip = 0.5 * torch.randn(B, T, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    colours = torch.eye(3).repeat(2, 1)[:K] * 2.0
    for b in range(B):
        i, j = torch.randint(0, 24, (2,), generator=g).tolist()
        frames = torch.randperm(T, generator=g)[:3]
        clip[b, frames, :, i:i + 8, j:j + 8] += colours[y[b]][:, None, None]
    return clip, y


def train(model, steps, g, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        clip, y = make_batch(g)
        loss = F.cross_entropy(model(clip), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(model, seed=1234):
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for _ in range(10):
        clip, y = make_batch(g)
        correct += (model(clip).argmax(1) == y).sum().item()
    return correct / 160


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = VideoResNet()
    print(f"pretrain {args.steps} steps: final loss {train(model, args.steps, g, 3e-3):.3f}")
    model.eval()
    print(f"accuracy with avgpool + fc: {accuracy(model):.3f}")

    clip, _ = make_batch(torch.Generator().manual_seed(99))
    before = model(clip)
    model.convert()
    after = model(clip)
    diff = (after - before).abs().max().item()
    print(f"after conversion: max |logit difference| = {diff:.2e} "
          f"(logits up to {before.abs().max().item():.2f})")
    assert diff <= 1e-5 * max(1.0, before.abs().max().item()), diff

    model.train()
    print(f"fine-tune {args.steps} steps: final loss {train(model, args.steps, g, 1e-3):.3f}")
    model.eval()
    print(f"accuracy with the attentional head: {accuracy(model):.3f}")


if __name__ == "__main__":
    main()
