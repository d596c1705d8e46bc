"""CO3 gradient compression against torch's own DDP hooks: LeNet-5 on the bundled MNIST digits.

    python benchmarks/bench_distributed.py [--epochs 6] [--seeds 0 1] [--configs fp32,co3-fp4-g0.9]

Two worker processes (gloo, FileStore, 127.0.0.1), each training on its half of the 4,000 training
digits with SGD + momentum (lr 0.05 decaying linearly to 0), the same fixed number of epochs for every configuration; test accuracy
on the 1,000 held-out digits. Bytes per step are what one worker contributes per optimizer step:
  fp32      no hook: the gradient, 4 bytes per parameter (DDP's allreduce payload);
  fp16      torch's fp16_compress_hook: 2 bytes per parameter;
  powersgd  torch's PowerSGD hook (rank 2, error feedback, warm start, compressing from step 10):
            the bytes of every tensor it passes to all_reduce, counted by wrapping all_reduce;
  co3-*     cdlcodec's hook: the frame bytes (header + code lengths + Huffman payload); the gloo
            column adds the size exchange and the padding to the largest frame that gloo's
            fixed-size all_gather needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
ALL_CONFIGS = ["fp32", "fp16", "powersgd"] + [
    f"co3-{fmt}-g{g}" for fmt in ("fp8", "fp4") for g in ("0", "0.7", "0.9")
]


def _train_one(rank: int, config: str, seed: int, epochs: int, data) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from cdlcodec.distributed import CO3State, co3_hook
    from cdlcodec.models import build
    from cdlcodec.training import evaluate

    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = build("lenet5")
    numel = sum(p.numel() for p in model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    counted = {"bytes": 0}
    real_all_reduce = dist.all_reduce
    state = None
    if config == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif config == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                                            start_powerSGD_iter=10, use_error_feedback=True, warm_start=True,
                                            random_seed=seed)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)

        def counting_all_reduce(tensor, *args, **kwargs):
            counted["bytes"] += tensor.numel() * tensor.element_size()
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
    elif config.startswith("co3-"):
        _, fmt, g = config.split("-")
        state = CO3State(fmt=fmt, gamma=float(g[1:]))
        ddp.register_comm_hook(state, co3_hook)

    # Each worker trains on its own half of the data, in a per-epoch order shared by both workers.
    xs, ys = torch.from_numpy(xtr[rank::WORLD]), torch.from_numpy(ytr[rank::WORLD])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    batch = 32
    total_steps = epochs * (len(ys) // batch)
    # Linear decay to zero: the final accuracy then reflects the run, not the last few noisy steps.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total_steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    started = time.perf_counter()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(ys), generator=gen)
            for start in range(0, len(ys) - batch + 1, batch):
                idx = order[start:start + batch]
                opt.zero_grad(set_to_none=True)
                loss_fn(ddp(xs[idx]), ys[idx]).backward()
                opt.step()
                sched.step()
                steps += 1
    finally:
        dist.all_reduce = real_all_reduce
    seconds = time.perf_counter() - started
    acc = evaluate(model, xte, yte)
    if config == "fp32":
        per_step = wire_step = numel * 4
    elif config == "fp16":
        per_step = wire_step = numel * 2
    elif config == "powersgd":
        per_step = wire_step = counted["bytes"] / steps
    else:
        st = state.stats()
        assert st["steps"] == steps, (st, steps)
        per_step, wire_step = st["bytes_per_step"], st["bytes_on_wire"] / steps
    extra = {}
    if config.startswith("co3-"):
        st = state.stats()
        extra = {"encode_ms": 1e3 * st["encode_s"] / steps, "decode_ms": 1e3 * st["decode_s"] / steps}
    return {"config": config, "seed": seed, "acc": acc, "bytes_per_step": per_step,
            "wire_bytes_per_step": wire_step, "steps": steps, "seconds": seconds, **extra}


def _worker(rank: int, store_path: str, configs: list[str], seeds: list[int], epochs: int, out_path: str):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    from cdlcodec.data.mnist import load_mnist_5k

    data = load_mnist_5k()
    results = []
    for seed in seeds:
        for config in configs:
            r = _train_one(rank, config, seed, epochs, data)
            results.append(r)
            if rank == 0:
                print(f"  {config:14s} seed {seed}: acc {100 * r['acc']:.1f}%  {r['bytes_per_step']:9.0f} B/step"
                      f"  {r['seconds']:.1f} s", flush=True)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


def summarize(results: list[dict]) -> str:
    configs = list(dict.fromkeys(r["config"] for r in results))
    by = {c: [r for r in results if r["config"] == c] for c in configs}
    base_acc = np.mean([r["acc"] for r in by["fp32"]]) if "fp32" in by else float("nan")
    base_bytes = by["fp32"][0]["bytes_per_step"] if "fp32" in by else float("nan")
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"| config | acc % (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}) | per seed | Δ vs fp32 (pts) "
        "| bytes/step | ÷ fp32 | gloo wire bytes/step | encode ms/step | decode ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        rs = by[c]
        acc = 100 * np.mean([r["acc"] for r in rs])
        per_seed = " / ".join(f"{100 * r['acc']:.1f}" for r in rs)
        b = np.mean([r["bytes_per_step"] for r in rs])
        w = np.mean([r["wire_bytes_per_step"] for r in rs])
        enc = f"{np.mean([r['encode_ms'] for r in rs]):.1f}" if "encode_ms" in rs[0] else "-"
        dec = f"{np.mean([r['decode_ms'] for r in rs]):.1f}" if "decode_ms" in rs[0] else "-"
        lines.append(f"| {c} | {acc:.2f} | {per_seed} | {acc - 100 * base_acc:+.2f} | {b:,.0f} | "
                     f"{base_bytes / b:.1f}x | {w:,.0f} | {enc} | {dec} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--configs", default=",".join(ALL_CONFIGS))
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in ALL_CONFIGS:
            ap.error(f"unknown config {c!r} (known: {', '.join(ALL_CONFIGS)})")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        print(f"LeNet-5, bundled MNIST (2 x 2,000 training digits, 1,000 test), {WORLD} gloo workers, "
              f"{args.epochs} epochs, SGD lr 0.05 -> 0 (linear) momentum 0.9, batch 32 per worker, seeds {args.seeds}")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), configs, args.seeds, args.epochs, out),
                 nprocs=WORLD, join=True)
        with open(out) as fh:
            results = json.load(fh)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print()
    print(summarize(results))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
