"""One readable training loop (nanoGPT style) for causal LMs: fine-tuning (paper 001 §2.2(3),
A.2), auxiliary-loss training (paper 001 §3.4 / B.4, papers 002/003) and rebuilding the zoo.

::

    for step in 1..steps:
        lr = lr_at(step - 1)                          # linear warm-up, cosine to min_lr
        for micro in 1..grad_accum:
            batch = sample_batch(step, micro)         # random windows, rows from each domain
            ce, aux = forward(batch)                  # bf16 autocast on CUDA, fp32 on CPU
            (ce + aux_lambda * aux) / grad_accum -> backward
        clip grad norm; AdamW step; zero grads
        log; every eval_every: per-(domain, split) perplexity; at save_at: checkpoint

Data. ``tokens`` maps a domain name to a 1-D array of token ids (documents joined by eos), or
to a ``zoo.TokenSplit`` holding that domain's range. Every row of a batch is a window of
``seq_len + 1`` tokens at a random start in one domain (input ``x[:-1]``, target ``x[1:]``);
with several domains the ``batch_size`` rows are divided between them (``domain_weights``,
equal by default) and ``Batch.domain`` gives each row's domain index, so a cross-domain
auxiliary loss (paper 001 §3.4) can pair rows of different domains. The windows of step s are
drawn from ``numpy.random.default_rng([seed, s, micro])`` and dropout is seeded from the same
triple, so a run is a function of its spec (bit-identical on CPU) and resuming needs no RNG
state.

Loss. Mean next-token cross entropy, plus ``aux_lambda * aux_loss(outputs, batch)`` when an
``aux_loss`` callable is given; the model is then called with ``output_hidden_states=True``
(``outputs.hidden_states``: embeddings, every block, the last one after the final norm, each
``[B, T, d]``, bf16 under autocast: cast with ``.float()`` as needed). With ``aux_lambda == 0``
the auxiliary term is computed for the log only (no gradient).

Optimizer. AdamW; weight decay only on >= 2-D weights that are not embeddings (biases, norm
gains and embedding/tied-LM-head tables are not decayed); only ``requires_grad`` parameters are
optimized (LoRA adapters, or everything for full fine-tuning).

Evaluation. ``eval_tokens`` maps ``(domain, split)`` to a 1-D array; ``eval_batches *
batch_size`` windows of ``seq_len + 1`` tokens, evenly spaced over the array, are fixed once
(the same at every evaluation and in every run); ``ppl = exp(mean token NLL)`` over them.
Evaluations run at step 0 (before any update), every ``eval_every`` steps, at every checkpoint
step and at the last step (so each checkpoint has its own evaluation).

Output folder ``out_dir``::

    metrics.jsonl            one JSON row per line (see METRIC_FIELDS), appended as it runs
    step{N}/                 config.json, model.safetensors, tokenizer files (loadable by
                             ``modeling.load_model``), plus the trainer's resume state:
                             optimizer.pt, trainable.safetensors (only when some parameters are
                             frozen or a custom ``export`` is used), trainer_state.json (last)

A checkpoint is written into a hidden temporary sibling and renamed into place, so a folder
``stepN`` is always complete. Checkpoints are saved at every step of ``save_at`` and at the last
step. ``train`` on an ``out_dir`` that holds checkpoints of the same run (same spec and
``run_key``) resumes from the newest one (the metrics log is cut back to that step); a run that
is already complete returns at once with the model loaded from its last checkpoint. Checkpoints
of another run are an error. With a ``mirror`` (``dispersion.training.checkpoints.Mirror``) the folder is
also kept in a store (S3 in production): checkpoints and the metrics log are uploaded as they
are written, and a run whose local folder is missing or behind pulls the newest stored
checkpoint first, so a run moved to another machine resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from dispersion.core.config import Strict
from dispersion.core.errors import ConfigError, DataError, ModelError, NonFiniteError
from dispersion.core.ids import digest
from dispersion.core.threads import follow_share
from dispersion.training.checkpoints import (
    METRICS_FILE,
    STATE_FILE,
    TRAIN_FORMAT,
    Mirror,
    checkpoint_steps,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
)

# Rows of metrics.jsonl: kind "train" (one per step) and kind "eval" (one per domain and split).
METRIC_FIELDS = {
    "train": ("kind", "step", "lr", "loss", "ce", "aux", "grad_norm", "tokens", "seconds"),
    "eval": ("kind", "step", "domain", "split", "loss", "ppl", "n_tokens", "seconds"),
}


def _key(payload: object) -> str:
    return digest(payload, chars=24)


class TrainSpec(Strict):
    """Hyper-parameters of one training run (every field that changes the weights is hashed).

    ``lr`` is the peak learning rate; the schedule warms up linearly over ``warmup_steps``
    and then follows a cosine to ``min_lr_ratio * lr`` at ``steps`` (:func:`lr_at`).
    ``batch_size`` rows of ``seq_len`` tokens per micro-batch, ``grad_accum`` micro-batches per
    optimizer step. ``grad_clip`` (``None`` = off) bounds the global gradient norm.
    ``eval_every`` (``None`` = only at step 0, the ``save_at`` steps and the last step),
    ``eval_batches`` batches of fixed windows per (domain, split). ``device`` ``auto`` = CUDA
    when available; ``dtype`` ``auto`` = bf16 autocast on CUDA, fp32 on CPU (weights and
    optimizer stay fp32).
    ``domain_weights``: share of the rows of each domain (equal when ``None``).
    """

    steps: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)] = 16
    seq_len: Annotated[int, Field(ge=2)] = 128
    grad_accum: Annotated[int, Field(gt=0)] = 1
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    eval_every: Annotated[int, Field(gt=0)] | None = None
    eval_batches: Annotated[int, Field(gt=0)] = 4
    save_at: list[Annotated[int, Field(ge=0)]] = []
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    aux_lambda: float = 0.0
    domain_weights: dict[str, Annotated[float, Field(gt=0)]] | None = None
    log_every: Annotated[int, Field(gt=0)] = 1

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if any(s > self.steps for s in self.save_at):
            raise ValueError(f"save_at: step {max(self.save_at)} is beyond steps {self.steps}")
        return self

    def weights_key(self, amp: str) -> dict:
        """The fields that change the trained weights (not logging, evaluation or saving)."""
        payload = self.model_dump(exclude={"eval_every", "eval_batches", "save_at", "device", "dtype",
                                           "log_every"})
        payload["amp"] = amp
        return payload


@dataclass
class Batch:
    """One micro-batch: ``input_ids`` and ``labels`` ``[B, T]`` (labels = inputs shifted by one),
    ``domain`` ``[B]`` the index of each row's domain in ``domains``."""

    input_ids: Any
    labels: Any
    domain: Any
    domains: tuple[str, ...]


@dataclass
class TrainResult:
    out_dir: Path
    step: int                                   # steps done (== spec.steps)
    resumed_from: int | None                    # checkpoint step resumed from, if any
    checkpoints: dict[int, Path]                # step -> folder
    final_loss: float | None                    # mean train loss of the last step (None if none ran)
    eval: dict[tuple[str, str], float]          # (domain, split) -> perplexity at the last evaluation
    metrics_path: Path
    seconds: float
    history: list[dict] = field(default_factory=list)  # every metrics row of the run, resumed part included
    urls: dict[int, str] = field(default_factory=dict)  # step -> stored checkpoint URL (with a mirror)


# ----------------------------------------------------------------------------- pieces


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate of update ``step`` (0-based): ``lr * (step+1) / warmup`` during warm-up,
    then ``lo + (lr - lo) * (1 + cos(pi * f)) / 2`` with ``f = (step - warmup) / (steps - warmup)``
    and ``lo = min_lr_ratio * lr``."""
    peak, warm = spec.lr, spec.warmup_steps
    lo = spec.min_lr_ratio * peak
    if step < warm:
        return peak * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, spec.steps - warm))
    return lo + 0.5 * (peak - lo) * (1.0 + math.cos(math.pi * frac))


def domain_arrays(tokens: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{domain: 1-D int array}`` from arrays or ``TokenSplit``s (sliced to the domain's range)."""
    out = {}
    for dom, v in tokens.items():
        if hasattr(v, "ids") and hasattr(v, "domains"):
            if dom not in v.domains:
                raise DataError(f"tokens: domain {dom!r} is not in the token split (has {sorted(v.domains)})")
            a, b = v.domains[dom]
            v = v.ids[a:b]
        arr = np.asarray(v)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"tokens: {dom!r} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        out[str(dom)] = arr
    return out


def rows_per_domain(domains: tuple[str, ...], batch_size: int, weights: Mapping[str, float] | None) -> list[int]:
    """How many of ``batch_size`` rows each domain gets (largest remainder, ties to the first)."""
    if batch_size < len(domains):
        raise ConfigError(f"train.batch_size: {batch_size} rows cannot hold {len(domains)} domains")
    if weights is not None and set(weights) != set(domains):
        raise ConfigError(f"train.domain_weights: keys {sorted(weights)} must be the domains {sorted(domains)}")
    w = np.array([1.0 if weights is None else weights[d] for d in domains])
    exact = batch_size * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[:batch_size - counts.sum()]:
        counts[i] += 1
    if (counts == 0).any():
        raise ConfigError(f"train.domain_weights: a domain gets no row of {batch_size} ({dict(zip(domains, counts))})")
    return counts.tolist()


def sample_batch(arrays: Mapping[str, np.ndarray], counts: list[int], seq_len: int, seed: int, step: int,
                 micro: int = 0) -> Batch:
    """The micro-batch ``micro`` of update ``step``: random windows, rows grouped by domain."""
    import torch

    rng = np.random.default_rng([seed, step, micro])
    offsets = np.arange(seq_len + 1)
    rows, dom = [], []
    for i, arr in enumerate(arrays.values()):
        starts = rng.integers(0, arr.size - seq_len, size=counts[i])
        rows.append(arr[starts[:, None] + offsets])
        dom += [i] * counts[i]
    x = torch.from_numpy(np.concatenate(rows).astype(np.int64))
    return Batch(x[:, :-1], x[:, 1:], torch.tensor(dom, dtype=torch.long), tuple(arrays))


def fixed_windows(arr: np.ndarray, length: int, n: int):
    """``n`` windows of ``length`` tokens, evenly spaced over ``arr`` (``[n, length]`` int64)."""
    import torch

    starts = np.linspace(0, arr.size - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([arr[s:s + length] for s in starts]).astype(np.int64))


def amp_dtype(spec: TrainSpec, device) -> str:
    """``bfloat16`` (autocast) or ``float32`` for this spec on this device."""
    import torch

    if spec.dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return spec.dtype


def _autocast(device, amp: str):
    import torch

    if amp == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp))


def compute_loss(model, batch: Batch, aux_lambda: float = 0.0, aux_loss: Callable | None = None, *,
                 device=None, amp: str = "float32"):
    """``(loss, ce, aux)``: ``loss = ce + aux_lambda * aux`` (a tensor to backpropagate); ``aux``
    is ``None`` without ``aux_loss`` and detached when ``aux_lambda == 0``."""
    import torch
    import torch.nn.functional as F

    device = device or next(model.parameters()).device
    x, y = batch.input_ids.to(device), batch.labels.to(device)
    if batch.domain.device != device:
        batch = Batch(x, y, batch.domain.to(device), batch.domains)
    with _autocast(device, amp):
        out = model(input_ids=x, output_hidden_states=aux_loss is not None, use_cache=False)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    aux = None
    if aux_loss is not None:
        if aux_lambda != 0:
            aux = aux_loss(out, batch)
            return ce + aux_lambda * aux.float(), ce, aux
        with torch.no_grad():
            aux = aux_loss(out, batch)
    return ce, ce, aux


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on trainable >= 2-D non-embedding weights, none on the rest."""
    from torch import nn

    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
    if not decay and not no_decay:
        raise ModelError("train: the model has no trainable parameter")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, spec: TrainSpec):
    import torch

    return torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=(spec.betas[0], spec.betas[1]),
                             eps=spec.eps)


def clip_and_step(model, optimizer, grad_clip: float | None, lr: float) -> float:
    """Clip the global gradient norm to ``grad_clip``, set ``lr``, step and zero the grads;
    returns the norm before clipping."""
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    follow_share()  # side-by-side processes come and go: take the current share of the CPUs
    return norm


def evaluate(model, windows: Mapping[Any, Any], batch_size: int, *, device=None, amp: str = "float32") -> dict:
    """``{key: (mean token NLL, n tokens)}`` over each key's fixed windows ``[n, T+1]``."""
    import torch
    import torch.nn.functional as F

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.no_grad():
            for key, w in windows.items():
                total, n = 0.0, 0
                for i in range(0, len(w), batch_size):
                    x = w[i:i + batch_size].to(device)
                    with _autocast(device, amp):
                        logits = model(input_ids=x[:, :-1], use_cache=False).logits
                    nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
                    total += float(nll)
                    n += x[:, 1:].numel()
                out[key] = (total / n, n)
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- keys




# ----------------------------------------------------------------------------- the loop


def train(model, tokens: Mapping[str, Any], spec: TrainSpec, *, out_dir: str | os.PathLike,
          eval_tokens: Mapping[tuple[str, str], Any] | None = None, aux_loss: Callable | None = None,
          on_eval: Callable[[int, dict], None] | None = None, tokenizer=None, export: Callable | None = None,
          run_key: object = None, mirror: Mirror | None = None, progress: bool = False,
          restart_stale: bool = False) -> TrainResult:
    """Train ``model`` (a ``transformers`` causal LM, possibly wrapped by ``peft``) in place.

    ``tokens``: ``{domain: ids}`` training data; ``eval_tokens``: ``{(domain, split): ids}``;
    ``aux_loss(outputs, batch) -> scalar`` added with weight ``spec.aux_lambda``;
    ``on_eval(step, {(domain, split): ppl})`` after every evaluation; ``tokenizer``: a folder
    or tokenizer object copied into every checkpoint; ``export(model, folder)`` writes the
    loadable model of a checkpoint (default ``model.save_pretrained``); ``run_key``: anything
    JSON-able identifying the model, data and loss, hashed with the spec to tell whether
    ``out_dir``'s checkpoints belong to this run; ``mirror``: a store copy of the run
    (``checkpoints.Mirror``): every checkpoint and the metrics log are uploaded as they are
    written, and a newer stored checkpoint than any in ``out_dir`` is pulled and resumed from.
    Checkpoints of another run in ``out_dir`` are an error, or, with ``restart_stale`` (a folder
    the caller owns and keys itself), removed so that training starts afresh.
    The model is moved to ``spec.device`` and left there in eval mode. See the module doc.
    """
    import torch

    from dispersion.core.progress import Progress
    from dispersion.measure.modeling import max_positions, resolve_device

    out = Path(out_dir)
    device = resolve_device(spec.device)
    amp = amp_dtype(spec, device)
    arrays = domain_arrays(tokens)
    if not arrays:
        raise DataError("train: no training tokens")
    for dom, arr in arrays.items():
        if arr.size < spec.seq_len + 2:
            raise DataError(f"train: domain {dom!r} has {arr.size} tokens, fewer than seq_len + 2 = {spec.seq_len + 2}")
    context = max_positions(model.config)
    if context is not None and spec.seq_len > context:
        raise ConfigError(f"train.seq_len: {spec.seq_len} exceeds the model's context length {context}")
    counts = rows_per_domain(tuple(arrays), spec.batch_size, spec.domain_weights)
    windows = {}
    for (dom, split), ids in (eval_tokens or {}).items():
        arr = domain_arrays({dom: ids})[dom]
        if arr.size < spec.seq_len + 1:
            raise DataError(f"train: eval tokens of {dom!r}/{split!r} are fewer than seq_len + 1 = {spec.seq_len + 1}")
        windows[(dom, split)] = fixed_windows(arr, spec.seq_len + 1, spec.eval_batches * spec.batch_size)

    key = _key({"format": TRAIN_FORMAT, "spec": spec.weights_key(amp), "run": run_key,
                   "domains": {d: int(a.size) for d, a in arrays.items()}, "rows": counts})
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, spec)
    metrics_path = out / METRICS_FILE
    checkpoints: dict[int, Path] = {}
    history: list[dict] = []
    start, resumed = 0, None

    if mirror is not None:
        mirror.sync_down(out, key)
    done = checkpoint_steps(out)
    if done and json.loads((out / f"step{done[-1]}" / STATE_FILE).read_text()).get("key") != key:
        if not restart_stale:
            raise ConfigError(f"train: {out} holds checkpoints of a different run (spec or model changed); "
                              f"use another out_dir or remove it")
        for step in done:  # the caller's own folder: the stale run goes, this one starts afresh
            shutil.rmtree(out / f"step{step}")
        metrics_path.unlink(missing_ok=True)
        done = []
    if done:
        last = out / f"step{done[-1]}"
        load_checkpoint(model, optimizer, last, device)
        start = resumed = done[-1]
        checkpoints = {s: out / f"step{s}" for s in done}
        history = truncate_metrics(metrics_path, start)
        if mirror is not None:  # the store may have missed the last uploads
            mirror.push_missing(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)

    t0 = time.perf_counter()
    last_eval: dict[tuple[str, str], float] = {}
    for r in history:
        if r["kind"] == "eval":
            last_eval[(r["domain"], r["split"])] = r["ppl"]
    final_loss = next((r["loss"] for r in reversed(history) if r["kind"] == "train"), None)
    save_at = set(spec.save_at) | {spec.steps}

    def log(row: dict) -> None:
        history.append(row)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


    def run_eval(step: int) -> None:
        if not windows:
            return
        t = time.perf_counter()
        res = evaluate(model, windows, spec.batch_size, device=device, amp=amp)
        for (dom, split), (nll, n) in res.items():
            ppl = math.exp(min(nll, 700.0))
            last_eval[(dom, split)] = ppl
            log({"kind": "eval", "step": step, "domain": dom, "split": split, "loss": nll, "ppl": ppl,
                 "n_tokens": n, "seconds": round(time.perf_counter() - t, 4)})
        if mirror is not None:
            mirror.push_metrics(metrics_path)
        if on_eval is not None:
            on_eval(step, dict(last_eval))

    def save(step: int) -> None:
        checkpoints[step] = save_checkpoint(model, optimizer, out / f"step{step}", step=step, key=key,
                                            tokenizer=tokenizer, export=export)
        if mirror is not None:  # metrics first: a log ahead of a checkpoint is cut back on resume
            mirror.push_metrics(metrics_path)
            mirror.push_checkpoint(checkpoints[step])

    def loop() -> float | None:
        loss_out = final_loss
        if resumed is None:
            run_eval(0)
            if 0 in save_at:
                save(0)
        bar = Progress(spec.steps, "train", unit="steps", initial=start, enabled=progress,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
        tokens_per_step = spec.batch_size * spec.seq_len * spec.grad_accum
        for step in range(start + 1, spec.steps + 1):
            lr = lr_at(step - 1, spec)
            ce_sum, aux_sum, loss_sum = 0.0, 0.0, 0.0
            for micro in range(spec.grad_accum):
                batch = sample_batch(arrays, counts, spec.seq_len, spec.seed, step, micro)
                torch.manual_seed(int(np.random.default_rng([spec.seed, step, micro, 1]).integers(2**31)))
                loss, ce, aux = compute_loss(model, batch, spec.aux_lambda, aux_loss, device=device, amp=amp)
                (loss / spec.grad_accum).backward()
                loss_sum += float(loss.detach())
                ce_sum += float(ce.detach())
                aux_sum += float(aux.detach()) if aux is not None else 0.0
            norm = clip_and_step(model, optimizer, spec.grad_clip, lr)
            loss_out = loss_sum / spec.grad_accum
            if not math.isfinite(loss_out):
                raise NonFiniteError(f"train: loss is {loss_out} at step {step} (lower train.lr?)")
            if step % spec.log_every == 0 or step == spec.steps:
                log({"kind": "train", "step": step, "lr": lr, "loss": loss_out, "ce": ce_sum / spec.grad_accum,
                     "aux": aux_sum / spec.grad_accum if aux_loss is not None else None, "grad_norm": norm,
                     "tokens": step * tokens_per_step, "seconds": round(time.perf_counter() - t0, 4)})
            bar.update(1)
            bar.note(f"loss {loss_out:.3f}")
            if (spec.eval_every and step % spec.eval_every == 0) or step == spec.steps or step in save_at:
                run_eval(step)
            if step in save_at:
                save(step)
        bar.close()
        return loss_out

    # the loop seeds torch's RNG (for dropout) at every step: the caller's RNG state is kept
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        final_loss = loop()
    model.eval()
    urls = {s: mirror.url(s) for s in sorted(set(mirror.steps()) & set(checkpoints))} if mirror is not None else {}
    return TrainResult(out, spec.steps, resumed, dict(sorted(checkpoints.items())), final_loss, last_eval,
                       metrics_path, time.perf_counter() - t0, history, urls)
