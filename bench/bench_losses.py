"""Cost of the dispersion losses (dispersion.training.losses) in training, and O(N d) push-away vs N x N.

(a) One training step (forward with hidden states, CE + aux, backward, clip + AdamW step via
    dispersion.training.train.compute_loss / clip_and_step), the same batch every step, for CE alone and
    CE + each loss, on zoo-sized random GPT-2 and Llama models (d = 128, 4 layers, T = 128,
    B = 16, vocab 4096). The configurations are interleaved round by round (one step of each per
    round, in a shuffled order) so load drift on a shared machine hits them alike; median over the
    rounds after warm-up. (a') the auxiliary loss alone, forward + backward on one layer's states.
(b) push-away forward + backward: ours (|sum u|^2, O(N d)) vs the naive N x N cosine matrix, time
    (median of repeats) and peak RSS above the RSS before the call (Linux VmHWM after clear_refs;
    on CUDA: peak allocated GPU memory above the allocation before the call), each (method, N) in
    a fresh subprocess.

On CUDA (``--device cuda``) the training step runs under bf16 autocast (``dtype auto`` of the
trainer) and every timed region is bracketed by ``torch.cuda.synchronize()``. Heads default to
``max(4, d / 64)`` and the Llama MLP width to 8d/3 rounded up to a multiple of 8 (4 and 344 at the
default d = 128), so ``--d 768 --layers 12 --T 512 --B 8 --vocab 50304`` is a GPT-2-124M-like shape.

    .venv/bin/python bench/bench_losses.py [--threads 1] [--rounds 20] [--skip-memory]
    python bench/bench_losses.py --device cuda --d 768 --layers 12 --T 512 --B 8 --vocab 50304
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dispersion.training import losses as L  # noqa: E402
from dispersion.training import train as T  # noqa: E402
from reference import push_away_full_matrix as naive_push_away  # noqa: E402  (tests/reference.py)
from rss import peak_rss_kb, reset_peak_rss  # noqa: E402  (bench/rss.py)

CONFIGS = [  # (label, LossSpec kwargs or None for CE alone); {L} = --layers, {N} = B * T
    ("CE only", None),
    *[(f"+ {name} ({loss.scope}, final)", dict(name=name)) for name, loss in L.LOSSES.items()],  # every loss
    ("+ push_away (flatten, all {L} layers)", dict(name="push_away", where="all")),
    ("+ dispersion (sequence, all {L} layers)", dict(name="dispersion", where="all")),
    ("+ dispersion (flatten N={N}, final)", dict(name="dispersion", scope="flatten")),
    ("+ dispersion (flatten, max_tokens=32)", dict(name="dispersion", scope="flatten", max_tokens=32)),
]


def configs(args) -> list[tuple[str, dict | None]]:
    """CONFIGS with the labels filled in for this run's shape."""
    return [(label.format(L=args.layers, N=args.B * args.T), kw) for label, kw in CONFIGS]


def make_model(arch: str, vocab: int, d: int, layers: int, ctx: int):
    heads = max(4, d // 64)  # 4 at d = 128 (the zoo's shape), 12 at d = 768 (GPT-2 small)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=layers, n_head=heads, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=ctx, hidden_size=d, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=-(-(8 * d // 3) // 8) * 8, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(args) -> dict:
    device = torch.device(args.device)
    results = {}
    for arch in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = make_model(arch, args.vocab, args.d, args.layers, args.T).to(device)
        model.train()
        spec = T.TrainSpec(steps=1, batch_size=args.B, seq_len=args.T, lr=1e-4, device=args.device)
        amp = T.amp_dtype(spec, device)  # dtype auto: bf16 autocast on CUDA, fp32 on CPU
        opt = T.make_optimizer(model, spec)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, args.vocab, (args.B, args.T + 1), generator=g)
        half = args.B // 2
        batch = T.Batch(x[:, :-1], x[:, 1:], torch.tensor([0] * half + [1] * (args.B - half)), ("a", "b"))
        fns = [(label, None if kw is None else L.make_aux_loss(L.LossSpec(lam=0.1, **kw)))
               for label, kw in configs(args)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = {label: [] for label, _ in fns}
        order = random.Random(0)
        for r in range(args.warmup + args.rounds):
            order.shuffle(fns)  # no configuration always follows the same one (allocator, cache state)
            for label, fn in fns:
                sync(device)
                t = time.perf_counter()
                loss, _, _ = T.compute_loss(model, batch, 0.1 if fn is not None else 0.0, fn, device=device, amp=amp)
                loss.backward()
                T.clip_and_step(model, opt, 1.0, 1e-4)
                sync(device)
                if r >= args.warmup:
                    times[label].append(time.perf_counter() - t)
        results[arch] = {label: statistics.median(v) for label, v in times.items()}
        results[arch]["_amp"] = amp
        if device.type == "cuda":
            results[arch]["_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        del model, opt
    return results


def loss_only(args) -> dict:
    """Forward + backward of each auxiliary loss alone on hidden states [B, T, d] (one layer)."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    H = (torch.randn(args.B, args.T, args.d, generator=g) + 0.3).to(device).requires_grad_(True)
    batch = T.Batch(None, None, torch.tensor([0] * (args.B // 2) + [1] * (args.B - args.B // 2)), ("a", "b"))
    out = type("Outputs", (), {"hidden_states": (H, H)})()
    res = {}
    for label, kw in configs(args):
        if kw is None or kw.get("where") == "all":
            continue
        fn = L.make_aux_loss(L.LossSpec(**kw))
        times = []
        for r in range(3 + args.rounds):
            H.grad = None
            sync(device)
            t = time.perf_counter()
            fn(out, batch).backward()
            sync(device)
            if r >= 3:
                times.append(time.perf_counter() - t)
        res[label] = statistics.median(times)
    return res


# ----------------------------------------------------------------------------- (b) push-away


def child(args) -> None:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    H = (torch.randn(args.n, args.d) + 0.5).to(device).requires_grad_(True)
    fn = (lambda h: L.push_away(h[None])) if args.method == "ours" else naive_push_away
    times, val = [], None
    if cuda:
        fn(H).backward()  # warm-up: CUDA context, kernels and the allocator, outside the measurement
        H.grad = None
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    for _ in range(args.repeats):
        H.grad = None
        sync(device)
        t = time.perf_counter()
        loss = fn(H)
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - t)
        val = float(loss.detach())
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else (peak_rss_kb() - base) / 1024
    print(json.dumps({"seconds": statistics.median(times), "peak_mb": peak, "value": val}))


def push_away_table(args) -> list[dict]:
    rows = []
    for n in args.n_list:
        row = {"N": n}
        for method in ("ours", "naive"):
            if method == "naive" and n > args.naive_max:
                row[method] = None
                continue
            cmd = [sys.executable, __file__, "--child", "--method", method, "--n", str(n), "--d", str(args.d),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[method] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on the loaded 2-core box)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n-list", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--naive-max", type=int, default=16384, help="largest N for the N x N version")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    cuda = torch.device(args.device).type == "cuda"
    gpu = f" ({torch.cuda.get_device_name(torch.device(args.device))})" if cuda else ""
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}{gpu}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if not args.skip_train:
        res = train_steps(args)
        print(f"\n(a) training step, B={args.B}, T={args.T}, d={args.d}, {args.layers} layers, vocab {args.vocab}, "
              f"{res['gpt2']['_amp']}{' autocast' if res['gpt2']['_amp'] != 'float32' else ''}; "
              f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up")
        if cuda:
            print(f"peak GPU memory over all configurations: GPT-2 {res['gpt2']['_peak_gpu_mb']:.0f} MB, "
                  f"Llama {res['llama']['_peak_gpu_mb']:.0f} MB")
        print("\n| loss | GPT-2 ms/step | ratio | Llama ms/step | ratio |")
        print("|---|---:|---:|---:|---:|")
        for label, _ in configs(args):
            g, lm = res["gpt2"][label], res["llama"][label]
            print(f"| {label} | {1e3 * g:.1f} | {g / res['gpt2']['CE only']:.3f}x | {1e3 * lm:.1f} | "
                  f"{lm / res['llama']['CE only']:.3f}x |")
        alone = loss_only(args)
        print(f"\n(a') the auxiliary loss alone, forward + backward on one layer's states "
              f"[{args.B}, {args.T}, {args.d}], median of {args.rounds}\n")
        print("| loss | ms | share of the GPT-2 CE step |")
        print("|---|---:|---:|")
        for label, sec in alone.items():
            print(f"| {label.lstrip('+ ')} | {1e3 * sec:.2f} | {sec / res['gpt2']['CE only']:.3f} |")
    if not args.skip_memory:
        what = "peak GPU memory allocated" if cuda else "peak RSS"
        print(f"\n(b) push-away forward + backward, d={args.d}, float32, {args.device}, median of {args.repeats}; "
              f"{what} above that before the call\n")
        print("| N | ours s | ours peak MB | naive s | naive peak MB | speedup | |ours - naive| |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in push_away_table(args):
            o, nv = row["ours"], row["naive"]
            if nv is None:
                print(f"| {row['N']} | {o['seconds']:.4f} | {o['peak_mb']:.0f} | skipped "
                      f"({row['N'] ** 2 * 4 / 2**30:.0f} GiB per N x N matrix) | - | - | - |")
            else:
                print(f"| {row['N']} | {o['seconds']:.4f} | {o['peak_mb']:.0f} | {nv['seconds']:.4f} | "
                      f"{nv['peak_mb']:.0f} | {nv['seconds'] / o['seconds']:.0f}x | "
                      f"{abs(o['value'] - nv['value']):.1e} |")


if __name__ == "__main__":
    main()
