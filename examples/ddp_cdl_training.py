"""Train a CDL LeNet-5 with DistributedDataParallel; parameters travel between workers coded.

    python examples/ddp_cdl_training.py [--epochs 4] [--fp-epochs 2] [--lam 3e-5] [--grad-hook co3-fp8]

Two gloo workers on one machine each train on half of the bundled MNIST digits (R-CDL, 4-bit
weights, 8-bit first/last layer, Adam with the CDL parameter groups). The weight-entropy term
lambda * H(w) of the CDL loss (CDL paper eq. 30) pushes the rate of the quantized weights down.

After every epoch worker 0 broadcasts the model as a parameter server would: every CDL layer's
weight is sent with `encode_tensor(layer.weight, layer)` (its current step q and bit width, hard
quantization, Huffman-coded levels), biases as float32. Worker 1 decodes them with
`decode_tensor` and checks that they equal, bit for bit, its own replica's eval-mode weights.
The bytes of that broadcast fall epoch by epoch as the entropy term lowers the rates, as in Fig. 7
of the CDL paper. Optionally the gradients themselves go through the CO3 hook (--grad-hook).

`--fp-epochs 0` trains from scratch: the quantizers start soft and sharpen on the schedule of
`cdlcodec train` (cdlcodec.cdl.train.SharpnessAnneal). A run that collapses (accuracy near chance,
dead layers, non-finite loss) ends with `ddp_cdl_training: error: <cause>` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def parameter_frames(model) -> list[bytes]:
    """Coded weights of every CDL layer, then every other parameter as raw float32 bytes."""
    from cdlcodec.cdl.convert import weight_quantizers
    from cdlcodec.distributed import encode_tensor

    frames, coded = [], set()
    for _, layer in weight_quantizers(model):
        frames.append(encode_tensor(layer.weight, layer, backend="huffman"))
        coded.add(id(layer.weight))
    for p in model.parameters():
        if id(p) not in coded and p.dim() > 0:  # biases (steps and sharpnesses are scalars: 4 bytes each)
            frames.append(p.detach().numpy().astype(np.float32).tobytes())
    return frames


def _pack(frames: list[bytes]) -> bytes:
    head = np.array([len(frames)] + [len(f) for f in frames], dtype=np.int64).tobytes()
    return head + b"".join(frames)


def _unpack(data: bytes) -> list[bytes]:
    n = int(np.frombuffer(data[:8], np.int64)[0])
    sizes = np.frombuffer(data[8:8 + 8 * n], np.int64)
    out, pos = [], 8 + 8 * n
    for s in sizes:
        out.append(data[pos:pos + int(s)])
        pos += int(s)
    return out


def _worker(rank: int, store_path: str, args) -> None:
    from cdlcodec.cdl.convert import (calibrate, convert, project_parameters, rescale_sharpness, set_generator,
                                      weight_quantizers)
    from cdlcodec.cdl.train import SharpnessAnneal, TrainConfig, diagnose_collapse
    from cdlcodec.cdl.loss import cdl_loss
    from cdlcodec.cdl.optim import CDLAdam, cdl_param_groups
    from cdlcodec.cdl.quantizer import hard_quantize
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.distributed import CO3State, co3_hook, decode_tensor
    from cdlcodec.distributed.exchange import broadcast_bytes
    from cdlcodec.models import build
    from cdlcodec.training import evaluate, train_classifier

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    (xtr, ytr), (xte, yte) = load_mnist_5k()
    torch.manual_seed(0)
    # Optional warm start (docs/cdl.md recipe): identical full-precision training on both workers,
    # then convert, least-squared-error steps and scale-aware sharpness, annealed from soft to sharp.
    model = build("lenet5")
    if args.fp_epochs:
        model = train_classifier(model, xtr, ytr, epochs=args.fp_epochs, seed=0, quiet=True)
    config = TrainConfig(mode="rcdl", bits=4, lam=args.lam, epochs=args.epochs, batch_size=32)
    model = convert(model, bits=config.bits, first_last_bits=8, mode=config.mode)
    calibrate(model, torch.from_numpy(xtr[:64]), step_init="mse")  # the same batch on both workers
    rescale_sharpness(model, config.sharpness_start)
    set_generator(model, torch.Generator().manual_seed(1 + rank))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    grad_state = None
    if args.grad_hook != "none":
        grad_state = CO3State(fmt=args.grad_hook.split("-")[1], gamma=0.7)
        ddp.register_comm_hook(grad_state, co3_hook)
    opt = CDLAdam(cdl_param_groups(model, lr_w=2e-3, lr_q=config.lr_q, lr_s=config.lr_s, lr_alpha=100.0,
                                            lr_beta=100.0, sharpness_reference=500.0))   # the train defaults
    xs, ys = torch.from_numpy(xtr[rank::WORLD]), torch.from_numpy(ytr[rank::WORLD])
    gen = torch.Generator().manual_seed(0)
    steps = args.epochs * ((len(ys) + config.batch_size - 1) // config.batch_size)
    anneal = SharpnessAnneal(config.sharpness_start, config.sharpness_constant, steps, config.anneal_fraction)
    step = 0
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{'epoch':>5} {'acc %':>6} {'H(w) b/w':>9} {'coded bytes':>12} {'fp32 bytes':>11} {'ratio':>6}", flush=True)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(ys), generator=gen)
        correct = 0
        for start in range(0, len(ys), config.batch_size):
            idx = order[start:start + config.batch_size]
            logits = ddp(xs[idx])
            parts = cdl_loss(model, logits, ys[idx], lam=args.lam)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            project_parameters(model)
            step += 1
            anneal.apply(model, step)   # the same floor on both workers: replicas stay identical
            correct += int((logits.detach().argmax(1) == ys[idx]).sum())
        model.eval()
        # The coded parameter broadcast from worker 0.
        blob = broadcast_bytes(_pack(parameter_frames(model)) if rank == 0 else None, src=0)
        frames = _unpack(blob)
        coded_bytes = sum(len(f) for f in frames) + 4 * 2 * len(weight_quantizers(model))  # + q, alpha
        if rank == 1:
            for frame, (name, layer) in zip(frames, weight_quantizers(model)):
                mine = hard_quantize(layer.weight, layer.q, *layer.bounds)
                if not torch.equal(decode_tensor(frame), mine):
                    raise AssertionError(f"decoded {name}.weight differs from this worker's replica")
        if rank == 0:
            acc = evaluate(model, xte, yte)
            print(f"{epoch:5d} {100 * acc:6.1f} {parts.weight_bits_per_element or float('nan'):9.3f} "
                  f"{coded_bytes:12,d} {fp32_bytes:11,d} {fp32_bytes / coded_bytes:5.1f}x", flush=True)
    if rank == 0 and grad_state is not None:
        st = grad_state.stats()
        print(f"gradients ({args.grad_hook}): {st['bytes_per_step']:,.0f} bytes/step, ratio {st['compression_ratio']:.1f}x")
    if rank == 0:
        probe = torch.from_numpy(xte[:256])
        verdict = diagnose_collapse(model, acc, 0.1, steps, correct / len(ys), config, probe)
        if verdict is not None:
            with open(os.path.join(os.path.dirname(store_path), "collapse.txt"), "w") as f:
                f.write(verdict)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DDP training of a CDL LeNet-5 with coded parameter broadcasts")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--fp-epochs", type=int, default=2,
                    help="full-precision warm-start epochs before converting (0: from scratch)")
    ap.add_argument("--lam", type=float, default=3e-5,
                    help="price of one bit of H(w), the whole model's weight entropy (CDL eq. 30): "
                         "lam·|w| per bit per weight, |w| = 61,470 for LeNet-5")
    ap.add_argument("--grad-hook", choices=["none", "co3-fp8", "co3-fp4"], default="none")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), args), nprocs=WORLD, join=True)
        verdict = os.path.join(tmp, "collapse.txt")
        if os.path.exists(verdict):
            with open(verdict) as f:
                print(f"ddp_cdl_training: error: {f.read()}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
