"""bf16 against fp32 extraction on the CPU: SmolLM2-135M, one run, the same segments.

The packaged SmolLM2-135M-Instruct (``packaged: smollm2-135m``) loaded twice through the scan's
own :func:`dispersion.measure.scan.load_extractor`, in float32 and in bfloat16, with
``torch.set_num_threads(<CPUs available>)``; segments from the project's sampling (seed 0,
embedded ``prose`` and ``code``, validation split). Both extract the scan's defaults (final
layer, block site, last and mean pools, BOS prepended; the NLL and the pooled sums accumulate in
fp32 in both). Reported: segment tokens/s of each at one batch size (best of ``--reps``), the
ratio bf16 / fp32, a bf16 2048^3 matmul against fp32 (what the CPU's bf16 units give at best),
and the agreement: per-segment mean NLL (absolute difference, nats per token), perplexity
(relative), pooled states (relative L2 error and cosine), and the dispersion of the pooled
vectors (Eq. 1 over all segments, relative).

Each dtype runs with the eager head and with the fused one (``extraction.fused_head``, the
compile done in the warm-up and reported); the agreement is bf16 with the fused head against
fp32 with the eager head (the default path).

Usage: python bench/bench_bf16.py [--per-domain 64] [--T 256] [--batch 16] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispersion.core.config import DatasetSpec, ExtractionSpec, ModelSpec, ScanConfig  # noqa: E402
from dispersion.measure.corpus import dataset_key, embedded_documents  # noqa: E402
from dispersion.measure.metrics import cosine_dispersion  # noqa: E402
from dispersion.measure.modeling import cpu_bf16, load_tokenizer  # noqa: E402
from dispersion.measure.sampling import sample_segments  # noqa: E402
from dispersion.measure.scan import load_extractor, model_revisions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_model import cpus, matmul_peak  # noqa: E402


def segments(tok, n: int, T: int) -> list[np.ndarray]:
    out = []
    for dom in ("prose", "code"):
        spec = DatasetSpec(name=dom, embedded=dom, split="validation")
        table = sample_segments(embedded_documents(dom, "validation"), tok, length=T, num_segments=n, seed=0,
                                dataset_key=dataset_key(spec), dataset_name=dom)
        out += [np.asarray(x, dtype=np.int32) for x in table.column("token_ids").to_pylist()]
    return out


def smollm2_args(doc: str, per_domain: int) -> argparse.ArgumentParser:
    """The options of a SmolLM2 CPU bench (this one and bench_compile.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--per-domain", type=int, default=per_domain)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--model-cache", default=".cache/models")
    return p


def smollm2_segments(args: argparse.Namespace):
    """Every CPU thread for torch, the packaged SmolLM2 (converted into ``--model-cache`` on first
    use) and ``--per-domain`` segments of ``--T`` tokens per domain: ``(model revision, segments)``."""
    torch.set_num_threads(cpus())
    cfg = ScanConfig(models=[ModelSpec(name="smollm2", packaged="smollm2-135m")],
                     datasets=[DatasetSpec(name="prose", embedded="prose")], model_cache=args.model_cache)
    [mr] = model_revisions(cfg, log=print)
    return mr, segments(load_tokenizer(mr.source), args.per_domain, args.T)


def main() -> None:
    args = smollm2_args(__doc__, per_domain=64).parse_args()
    mr, segs = smollm2_segments(args)
    tokens = sum(len(s) for s in segs)
    print(f"torch {torch.__version__}, {cpus()} threads, CPU bf16 (avx512_bf16 / AMX): {cpu_bf16()}, "
          f"load average {os.getloadavg()[0]:.2f} at start; {len(segs)} segments x {args.T} tokens, "
          f"batch {args.batch}")
    print(f"2048^3 matmul: fp32 {matmul_peak(reps=10, dtype=torch.float32) / 1e9:.1f} GFLOP/s, "
          f"bf16 {matmul_peak(reps=10, dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s")
    res, secs = {}, {}
    for name, dtype, fused in (("float32", "float32", False), ("float32+fused", "float32", True),
                               ("bfloat16", "bfloat16", False), ("bfloat16+fused", "bfloat16", True)):
        ex = load_extractor(mr, ExtractionSpec(batch_size=args.batch, device="cpu"), dtype, fused_head=fused)
        warm = ex.extract(segs[:args.batch])  # warm-up (and the fused head's compile)
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            out = ex.extract(segs)
            best = min(best, time.perf_counter() - t)
        secs[name] = best
        res[name] = {"nll": out.features["nll_sum"].astype(np.float64) / out.features["n_scored"],
                     "last": out.vectors[("final", "block", "last")].astype(np.float64),
                     "mean": out.vectors[("final", "block", "mean")].astype(np.float64)}
        compiled = f" (compile {warm.timings['compile_s']:.1f} s)" if "compile_s" in warm.timings else ""
        print(f"{name:15s}: {best:7.2f} s, {tokens / best:8.0f} tokens/s{compiled}")
        del ex
    print(f"bf16 / fp32 tokens/s: {secs['float32'] / secs['bfloat16']:.2f}x (eager heads); "
          f"{secs['float32'] / secs['bfloat16+fused']:.2f}x (bf16 fused head vs fp32 eager, the default)")
    for dtype in ("float32", "bfloat16"):
        f = res[dtype + "+fused"]["nll"] - res[dtype]["nll"]
        print(f"{dtype} fused / eager head: {secs[dtype] / secs[dtype + '+fused']:.2f}x tokens/s; "
              f"mean NLL per token differs by at most {np.abs(f).max():.1e} nats")
    a, b = res["float32"], res["bfloat16+fused"]
    dn = np.abs(a["nll"] - b["nll"])
    dp = np.abs(np.exp(b["nll"]) / np.exp(a["nll"]) - 1)
    print(f"mean NLL per token: |bf16 - fp32| median {np.median(dn):.2e}, max {dn.max():.2e} nats; "
          f"perplexity relative: median {np.median(dp):.2e}, max {dp.max():.2e}")
    for pool in ("last", "mean"):
        rel = np.linalg.norm(a[pool] - b[pool], axis=1) / np.linalg.norm(a[pool], axis=1)
        cos = np.sum(a[pool] * b[pool], 1) / np.linalg.norm(a[pool], axis=1) / np.linalg.norm(b[pool], axis=1)
        da, db = cosine_dispersion(a[pool]), cosine_dispersion(b[pool])
        print(f"pool {pool:4s}: relative L2 error median {np.median(rel):.2e}, max {rel.max():.2e}; "
              f"cosine min {cos.min():.6f}; dispersion fp32 {da:.6f} bf16 {db:.6f} (relative {abs(db / da - 1):.2e})")


if __name__ == "__main__":
    main()
