"""`cdlcodec.cdl.finetune` with the steps' base rates lr_q = lr_s = 0.01 (its former default) and 0.003
(the `cdlcodec train` default), issue 17: per seed, LeNet-5 trained 2 FP epochs on MNIST-5k, converted
(b = 4, first/last 8), fine-tuned 2 epochs (R-CDL, CDL, R-CDL with λ = 1e-6) with each rate from the
same FP model and batch order; one JSON line per run (test accuracy %, last epoch's H(w) per weight).

    python benchmarks/bench_cdl_finetune_lr.py [SEEDS, default 0]      # e.g. 0,1,2,3,4
"""
import copy, json, sys, time
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
import numba; numba.set_num_threads(1)
from cdlcodec.cdl.convert import convert
from cdlcodec.cdl.finetune import finetune
from cdlcodec.data.mnist import load_mnist_5k
from cdlcodec.models import build
from cdlcodec.training import evaluate, train_classifier
(xtr, ytr), (xte, yte) = load_mnist_5k()
seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0]
for seed in seeds:
    torch.manual_seed(seed)
    fp = train_classifier(build("lenet5"), xtr, ytr, epochs=2, seed=seed, quiet=True)
    fp_acc = evaluate(fp, xte, yte)
    for mode, lam in (("rcdl", 0.0), ("cdl", 0.0), ("rcdl", 1e-6)):
        for lr in (0.01, 0.003):
            torch.manual_seed(seed + 100)
            g = torch.Generator().manual_seed(seed)
            loader = DataLoader(TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)), batch_size=64,
                                shuffle=True, generator=g)
            model = convert(copy.deepcopy(fp), bits=4, first_last_bits=8, mode=mode)
            t0 = time.time()
            res = finetune(model, loader, F.cross_entropy, epochs=2, lam=lam, lr_q=lr, lr_s=lr)
            acc = evaluate(res.model, xte, yte)
            print(json.dumps({"seed": seed, "fp": round(100 * fp_acc, 2), "mode": mode, "lam": lam, "lr_qs": lr,
                              "acc": round(100 * acc, 2), "wbits": round(res.history[-1]["weight_bits_per_element"], 3),
                              "s": round(time.time() - t0, 1)}), flush=True)
