"""Compiled decoder blocks (``extraction.compile``) against eager ones on the CPU: one run.

SmolLM2-135M-Instruct (``packaged: smollm2-135m``) through the scan's own
:func:`dispersion.measure.scan.load_extractor`, in float32 (eager head) and in bfloat16 (fused
head, as ``auto`` runs it), each with eager and with compiled blocks, on the same segments
(seed 0, embedded ``prose`` and ``code``, validation split), ``torch.set_num_threads(<CPUs
available>)``; then the embedded zoo's step300 models (float32, random token ids, every layer)
when the zoo is built. Reported: segment tokens/s (best of ``--reps``, after a warm-up that
holds the compile), the compiled / eager ratio, the compile's seconds as the extractor reports
them, and the largest difference of the per-token mean NLL and of the pooled states between
compiled and eager. From these the break-even: compile seconds / seconds saved per token.

Usage: python bench/bench_compile.py [--per-domain 32] [--T 256] [--batch 16] [--reps 2]
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bf16 import smollm2_args, smollm2_segments  # noqa: E402
from bench_real_model import cpus  # noqa: E402

from dispersion.core.config import ExtractionSpec  # noqa: E402
from dispersion.measure.extract import Extractor  # noqa: E402
from dispersion.measure.modeling import load_model, resolve_source  # noqa: E402
from dispersion.measure.scan import load_extractor  # noqa: E402


def timed(make, segs: list[np.ndarray], reps: int) -> tuple[float, dict, float | None]:
    """Best seconds of ``reps`` extractions after a warm-up, the last output, the compile seconds."""
    ex = make()
    warm = ex.extract(segs[:2 * ex.batch_size])  # two full batches: the compile and its estimate
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = ex.extract(segs)
        best = min(best, time.perf_counter() - t)
    return best, out, warm.timings.get("compile_s")


def compare(label: str, make_eager, make_compiled, segs: list[np.ndarray], reps: int) -> None:
    tokens = sum(len(s) for s in segs)
    (te, eager, ce), (tc, comp, cc) = timed(make_eager, segs, reps), timed(make_compiled, segs, reps)
    nll = lambda o: o.features["nll_sum"] / o.features["n_scored"]  # noqa: E731
    dn = np.abs(nll(comp) - nll(eager)).max()
    dv = max(float(np.abs(comp.vectors[k].astype(np.float32) - v.astype(np.float32)).max()
                   / max(1e-12, float(np.abs(v.astype(np.float32)).max()))) for k, v in eager.vectors.items())
    saved = (te - tc) / tokens
    even = f"{(cc or 0) / saved:,.0f} tokens" if saved > 0 else "never (no gain)"
    head = f" (eager run's head compile {ce:.1f} s)" if ce else ""
    print(f"| {label} | {tokens / te:,.0f} | {tokens / tc:,.0f} | {te / tc:.2f}x | {cc or 0:.1f} | {even} | "
          f"{dn:.1e} | {dv:.1e} |{head}")


def main() -> None:
    p = smollm2_args(__doc__, per_domain=32)
    p.add_argument("--zoo", default=".cache/zoo")
    args = p.parse_args()
    mr, segs = smollm2_segments(args)
    print(f"torch {torch.__version__}, {cpus()} threads, load average {os.getloadavg()[0]:.2f} at start; "
          f"{len(segs)} segments x {args.T} tokens, batch {args.batch}, best of {args.reps}\n")
    print("| model | eager tokens/s | compiled tokens/s | compiled / eager | compile s | break-even | "
          "max NLL diff (nats/token) | max state diff (relative) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    spec = ExtractionSpec(batch_size=args.batch, device="cpu")
    for dtype, fused in (("float32", False), ("bfloat16", True)):
        compare(f"SmolLM2-135M {dtype}{' (fused head)' if fused else ''}",
                functools.partial(load_extractor, mr, spec, dtype, fused_head=fused),
                functools.partial(load_extractor, mr, spec, dtype, fused_head=fused, compiled=True), segs, args.reps)
    rng = np.random.default_rng(0)
    for name in ("gpt2-tiny", "llama-small"):
        folder = Path(args.zoo) / name / "step300"
        if not folder.exists():
            print(f"({folder} not built: `dispersion zoo build`)")
            continue
        model = load_model(resolve_source(str(folder), None), dtype="float32")
        vocab = int(model.config.vocab_size)
        zsegs = [rng.integers(5, vocab, args.T).astype(np.int32) for _ in range(8 * args.batch)]
        kw = dict(layers=["all"], prepend_bos=False, batch_size=args.batch)
        compare(f"zoo {name} float32 (every layer)", functools.partial(Extractor, model, **kw),
                functools.partial(Extractor, model, compile_blocks=True, **kw), zsegs, args.reps)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
