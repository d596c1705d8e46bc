"""The CO3 hook in real processes: 2 ranks spawned with torch.multiprocessing, gloo, a FileStore.

Every scenario runs inside the ranks and asserts there; torch.multiprocessing.spawn re-raises a
failing rank's exception here. Scenarios share one spawn per test to keep process start-up cheap.
"""
from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cdlcodec.distributed import CO3State, co3_codec, co3_hook, fpconv
from cdlcodec.distributed import exchange
from cdlcodec.errors import CdlDecodeError

WORLD = 2


class FakeBucket:
    """What the hook reads from torch's GradBucket (which cannot be built from Python)."""

    def __init__(self, values: np.ndarray, index: int, last: bool = True):
        self._buffer = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        self._index = index
        self._last = last

    def buffer(self):
        return self._buffer

    def index(self):
        return self._index

    def is_last(self):
        return self._last


def local_gradient(rank: int, size: int, step: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1000 * step + rank)
    return (rng.laplace(size=size) * (1e-3 * (rank + 1))).astype(np.float32)


def _init(rank: int, store_path: str, timeout_s: float = 30.0):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=timeout_s))


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------ exactness, error feedback, buckets

def _exactness(rank: int):
    for fmt in ("fp4", "fp8"):
        for source in ("gennorm", "histogram"):
            f = fpconv.get_format(fmt)
            g = local_gradient(rank, 3001)
            # 1. What a peer decodes equals, bit for bit, what the sender quantized.
            frame, ghat = co3_codec.encode_bucket(g, f, source)
            frames, _ = exchange.all_gather_bytes(frame)
            sent = [torch.zeros(g.size) for _ in range(WORLD)]
            dist.all_gather(sent, torch.from_numpy(ghat))
            for peer in range(WORLD):
                decoded = co3_codec.decode_bucket(frames[peer], g.size, f"worker {peer}")
                np.testing.assert_array_equal(_bits(decoded), _bits(sent[peer].numpy()))
            # 2. The hook's average equals the reference from the same quantized values.
            state = CO3State(fmt=fmt, code_source=source)
            out = co3_hook(state, FakeBucket(g, 0)).wait()
            ghats = [co3_codec.encode_bucket(local_gradient(r, 3001), f, source)[1] for r in range(WORLD)]
            reference = (ghats[0] + ghats[1]) / np.float32(WORLD)
            assert out.shape == (3001,) and out.dtype == torch.float32
            np.testing.assert_array_equal(_bits(out.numpy()), _bits(reference))
            st = state.stats()
            assert st["steps"] == 1 and st["bytes_sent"] == len(frame)
            assert st["raw_bytes"] == 4 * 3001 and st["compression_ratio"] > 32 / (f.bits + 1)

    # 3. Error feedback: m_t = gamma m_{t-1} + g_t - g^_t, and the hook sends Q(g_t + gamma m_{t-1}).
    f = fpconv.FP4
    gamma = 0.9
    state = CO3State(fmt="fp4", gamma=gamma)
    memory = {r: np.zeros(500, np.float32) for r in range(WORLD)}
    for step in range(3):
        out = co3_hook(state, FakeBucket(local_gradient(rank, 500, step), 7)).wait().numpy()
        ghats = []
        for r in range(WORLD):
            v = local_gradient(r, 500, step) + np.float32(gamma) * memory[r]
            _, gh = co3_codec.encode_bucket(v, f)
            memory[r] = v - gh
            ghats.append(gh)
        np.testing.assert_array_equal(_bits(out), _bits((ghats[0] + ghats[1]) / np.float32(2)))
        np.testing.assert_array_equal(_bits(state.memory[7]), _bits(memory[rank]))
    assert np.abs(memory[rank]).max() > 0

    # 4. Uneven and empty buckets, and frames of very different sizes on the two ranks
    #    (rank 1's buckets are all zeros: header-only frames).
    state = CO3State(fmt="fp8", gamma=0.7)
    for index, size in enumerate([0, 1, 5, 2999, 0, 64]):
        g = local_gradient(0, size, index) if rank == 0 else np.zeros(size, np.float32)
        out = co3_hook(state, FakeBucket(g, index, last=index == 5)).wait()
        assert out.shape == (size,)
        g0 = local_gradient(0, size, index)
        expected = co3_codec.encode_bucket(g0, fpconv.FP8)[1] / np.float32(2)
        np.testing.assert_array_equal(_bits(out.numpy()), _bits(expected))
    assert state.stats()["steps"] == 1

    # 5. Buffers arriving as float16 come back as float16 of the same shape.
    half = torch.from_numpy(local_gradient(rank, 100)).to(torch.float16)

    class HalfBucket(FakeBucket):
        def buffer(self):
            return half

    out = co3_hook(CO3State(fmt="fp8"), HalfBucket(np.zeros(1), 0)).wait()
    assert out.dtype == torch.float16 and out.shape == (100,)


# ------------------------------------------------------------------ a real DDP model

def _inside_ddp(rank: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 20, generator=gen), torch.randint(0, 3, (32,), generator=gen)

    def grads(model):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    # fp32 reference: plain DDP (bucket_cap small so the model spans several uneven buckets).
    plain = nn.parallel.DistributedDataParallel(_copy(net), bucket_cap_mb=0.0005)
    reference = grads(plain)

    measured = nn.parallel.DistributedDataParallel(_copy(net), bucket_cap_mb=0.0005)
    mstate = CO3State(fmt="fp4", measure_only=True)
    measured.register_comm_hook(mstate, co3_hook)
    torch.testing.assert_close(grads(measured), reference, rtol=1e-6, atol=1e-7)
    # DDP starts with one bucket and rebuilds after the first step: 3 uneven buckets here
    # (bucket 0 changes size, which also exercises the error memory's reset).
    torch.testing.assert_close(grads(measured), reference, rtol=1e-6, atol=1e-7)
    assert mstate.stats()["steps"] == 2 and mstate.stats()["buckets"] == 4, mstate.stats()
    assert 0 < mstate.stats()["bytes_sent"] < mstate.stats()["raw_bytes"] / 5

    for fmt in ("fp8", "fp4"):
        model = nn.parallel.DistributedDataParallel(_copy(net), bucket_cap_mb=0.0005)
        state = CO3State(fmt=fmt, gamma=0.7)
        model.register_comm_hook(state, co3_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            grads(model)
            opt.step()
        grads(model)
        # Every rank decodes all frames, so every rank applies the identical average.
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        all_flat = [torch.zeros_like(flat) for _ in range(WORLD)]
        dist.all_gather(all_flat, flat)
        assert torch.equal(all_flat[0], all_flat[1]), "ranks diverged"
        assert state.stats()["steps"] == 4 and state.stats()["buckets"] == 10
    # One compressed step against the fp32 step from the same weights.
    model = nn.parallel.DistributedDataParallel(_copy(net), bucket_cap_mb=0.0005)
    model.register_comm_hook(CO3State(fmt="fp8"), co3_hook)
    err = float((grads(model) - reference).norm() / reference.norm())
    assert err < 0.05, f"fp8 gradient relative error {err}"  # ~8-bit quantizer on a heavy-tailed bucket


def _copy(net: nn.Module) -> nn.Module:
    clone = type(net)(*[type(m)(*_ctor_args(m)) for m in net])
    clone.load_state_dict(net.state_dict())
    return clone


def _ctor_args(m: nn.Module):
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return ()


# ------------------------------------------------------------------ robustness

def _tamper(mode: str):
    real = co3_codec.encode_bucket

    def tampered(*args, **kwargs):
        frame, ghat = real(*args, **kwargs)
        if mode == "flip":
            bad = bytearray(frame)
            bad[len(bad) // 2] ^= 0x10
            return bytes(bad), ghat
        if mode == "truncate":
            return frame[: len(frame) - 9], ghat
        return b"\xff" * 37, ghat

    return real, tampered


def _robustness(rank: int):
    g = local_gradient(rank, 4000)
    # Corrupt frames from rank 1: every rank (all decode all frames) reports it and names worker 1.
    for mode, expected in (("flip", "CRC32"), ("truncate", "truncated"), ("garbage", "magic")):
        state = CO3State(fmt="fp4", timeout=5.0)
        real, tampered = _tamper(mode)
        if rank == 1:
            co3_codec.encode_bucket = tampered
        try:
            co3_hook(state, FakeBucket(g, 0)).wait()
        except CdlDecodeError as exc:
            assert "worker 1" in str(exc) and expected in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {rank}: a {mode} frame was accepted")
        finally:
            co3_codec.encode_bucket = real
    # The process group is still usable afterwards: a clean step works.
    out = co3_hook(CO3State(fmt="fp4"), FakeBucket(g, 0)).wait()
    assert out.shape == (4000,)
    # A peer that never joins: rank 0 fails after its timeout instead of hanging.
    if rank == 1:
        time.sleep(6.0)  # far longer than rank 0's timeout: what rank 0 sees is the timeout
        return
    try:
        co3_hook(CO3State(fmt="fp4", timeout=1.0), FakeBucket(g, 1)).wait()
    except CdlDecodeError as exc:
        assert "timed out" in str(exc).lower(), str(exc)
    else:
        raise AssertionError("a missing peer went unnoticed")


def _worker(rank: int, store_path: str):
    _init(rank, store_path, timeout_s=30.0)
    _exactness(rank)
    dist.barrier()
    _inside_ddp(rank)
    dist.barrier()
    _robustness(rank)  # last: it leaves rank 1 out of a collective on purpose


def test_co3_hook_in_two_gloo_processes(tmp_path):
    """Exact decoding and averaging, error feedback, uneven/empty buckets, the hook inside DDP,
    corrupt/truncated frames and a silent peer (one spawn: process start-up dominates the cost)."""
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
