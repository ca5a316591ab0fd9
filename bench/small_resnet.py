"""Training throughput of the design's quick-start network (one residual Add block),
cnet vs PyTorch in the same process, interleaved, medians of repeats.

    python bench/small_resnet.py [--threads 2] [--batch 128] [--repeats 15]

The network: Conv3x3(3->16, no bias) BN ReLU, Add(Conv3x3(16->16) ReLU, Identity),
GlobalAvgPool, Linear(16->10); SGD momentum 0.9; 32x32x3 inputs.
"""
import argparse
import statistics
import time

import cnet  # before numpy: cnet sets OpenBLAS options that its import reads
import numpy as np


def cnet_step_fn(batch, threads):
    from cnet import nn, optim
    cnet.manual_seed(0)
    cnet.set_num_threads(threads)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Add(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()), nn.Identity()),
        nn.GlobalAvgPool2d(), nn.Linear(16, 10))
    # torch computes no gradient for an input that does not require one; nor does cnet here.
    model.requires_input_grad_(False)
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
        return loss
    return step


def torch_step_fn(batch, threads, channels_last):
    import torch
    from torch import nn
    torch.manual_seed(0)
    torch.set_num_threads(threads)

    class AddBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return self.body(x) + x

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        AddBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    steps = {"cnet": cnet_step_fn(args.batch, args.threads)}
    try:
        steps["torch NCHW"] = torch_step_fn(args.batch, args.threads, False)
        steps["torch channels_last"] = torch_step_fn(args.batch, args.threads, True)
    except ImportError:
        print("torch not installed: cnet only")
    for fn in steps.values():  # warm-up: workspaces, thread pools
        for _ in range(3):
            fn()
    times = {k: [] for k in steps}
    for _ in range(args.repeats):  # interleaved so machine noise hits every contender
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {args.batch}, 32x32x3, {args.threads} threads, median of {args.repeats}")
    for k, t in med.items():
        print(f"  {k:<20} {t * 1e3:8.2f} ms/step  {args.batch / t:8.0f} images/s")
    torch_best = min((t for k, t in med.items() if k.startswith("torch")), default=None)
    if torch_best:
        print(f"  cnet / best torch throughput: {torch_best / med['cnet']:.2f}x")


if __name__ == "__main__":
    main()
