"""Where extraction time goes at one shape, and how the NLL chunk size and the batch move it.

For a preset of ``bench/bench_extract.py`` (default ``llama-3.2-1b``, random weights), 512-token
segments in the given dtype: the base model's forward alone (``model.model``, no LM head: the
ceiling for any extractor), then ``Extractor.extract`` at each batch size and each fp32-logit
budget (``dispersion.measure.head.LOGIT_BUDGET``, the logits held at once in the chunked
NLL). Model FLOP/s counts the full forward (LM head included) so every row compares directly;
the fraction is against a measured 8192^3 matmul in the same dtype.

Usage: python bench/bench_extract_breakdown.py [--shape llama-3.2-1b] [--n 512]
       [--batches 16,32,64] [--budgets 26,28,30] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bench_extract as B  # noqa: E402  (bench/bench_extract.py)

from dispersion.measure import head as E  # noqa: E402


def timed(fn, device: str) -> float:
    B._sync(device)
    t = time.perf_counter()
    fn()
    B._sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(B.SHAPES))
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--batches", default="16,32,64")
    p.add_argument("--budgets", default="26,28,30", help="log2 of the fp32 logits held at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    a = p.parse_args()
    dt = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    V, d, L, H, KV, mlp, tied = B.SHAPES[a.shape]
    model = B.make_model(V, d, L, a.T + 1, a.device, dt, H, KV, mlp, tied)
    segs = B.segments(a.n, a.T, V)
    fpt = B.flops_per_token(model, a.T + 1)
    peak = B.matmul_peak(a.device, dt, n=8192 if a.device.startswith("cuda") else 2048)
    work = fpt * a.n * (a.T + 1)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"{a.shape}, {a.n} x {a.T} tokens, {dt} on {name}; matmul peak {peak / 1e12:.1f} TFLOP/s\n")
    print("| what | batch | logit budget | seconds | model TFLOP/s | fraction of peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch in [int(x) for x in a.batches.split(",")]:
        ids = [torch.tensor([[1, *s.tolist()] for s in segs[i:i + batch]], device=a.device)
               for i in range(0, a.n, batch)]

        @torch.inference_mode()
        def base(ids=ids) -> None:
            for x in ids:
                model.model(input_ids=x)

        base()
        sec = timed(base, a.device)
        print(f"| base model forward only | {batch} | - | {sec:.2f} | {work / sec / 1e12:.1f} | "
              f"{work / sec / peak:.2f} |")
        for b in [int(x) for x in a.budgets.split(",")]:
            E.LOGIT_BUDGET = 2**b
            B.ours(model, segs[:batch], batch)
            sec = timed(lambda batch=batch: B.ours(model, segs, batch), a.device)
            print(f"| Extractor.extract | {batch} | 2^{b} | {sec:.2f} | {work / sec / 1e12:.1f} | "
                  f"{work / sec / peak:.2f} |")
        del ids
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
