"""The fine-tuning effect (paper 001 §2.2(3), appendix A.2): fine-tune a base model on one
domain with LoRA or on all parameters, then compare the dispersion of its representations
before and after, on that domain and on another one as a control.

Paper 001 A.2 (LLaMA-3.2-1B on WikiText-103, trained with LLaMA-Factory):

======================  =============================  =================================
                        A.2.1 LoRA                     A.2.2 full-parameter
======================  =============================  =================================
learning rate           1e-4                           1e-5
batch                   8 x 8 grad. accumulation = 64  2 x 2 devices x 16 accum. = 64
optimizer               AdamW (0.9, 0.999), eps 1e-8   Adam (0.9, 0.999), eps 1e-8
schedule                cosine, warm-up ratio 0.1      cosine, warm-up ratio 0.1
epochs                  1                              5
seed                    42                             42
eval loss reported      2.1764                         2.1333
======================  =============================  =================================

Not stated in the paper, so LLaMA-Factory's / the HF Trainer's defaults are used: LoRA rank 8,
alpha 16 (2 x rank), dropout 0, no weight decay, gradient clipping at 1.0, cosine decay to 0,
sequence length (``cutoff_len``) 2048. LLaMA-Factory's default LoRA target is every linear
layer (``target_modules: all``); the default here is the attention projections
(``attention``: GPT-2 ``attn.c_attn`` / ``attn.c_proj``, Llama-style ``q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj``), as in the original LoRA paper. Warm-up is ``ceil(0.1 x steps)``;
an epoch is counted in tokens: ``steps = ceil(epochs x train tokens / (batch x accum x seq_len))``
(windows are drawn at random positions, see :mod:`dispersion.training.train`).

These are the ``paper`` preset (:data:`PAPER_A2`). The ``embedded`` preset
(:data:`EMBEDDED_DEFAULTS`) scales them down for the embedded zoo and a CPU (fewer, shorter,
higher-learning-rate steps; the LoRA /
full learning-rate ratio and the schedule shape of the paper are kept). ``preset: auto`` is
``embedded`` for zoo models and ``paper`` otherwise; every hyper-parameter given explicitly
overrides the preset.

Output of :func:`finetune` (``out_dir`` is a local folder)::

    {out_dir}/{method}/metrics.jsonl    the training log (dispersion.training.train.METRIC_FIELDS)
    {out_dir}/{method}/step{N}/         checkpoints (plain model folders, LoRA merged), with resume state
    {out_dir}/{method}/adapter/         LoRA only: the trained adapter (peft ``save_pretrained``)
    {out_dir}/{method}/final/           the fine-tuned model: config.json, model.safetensors,
                                        tokenizer, finetune.json (spec, base, summary), _SUCCESS

``final`` is what :func:`finetune` returns and what ``modeling.load_model`` loads; a call
whose ``final/_SUCCESS`` matches the spec returns at once, an interrupted one resumes from
its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from dispersion.core.config import HFDatasetSource, Strict, ZooSpec, validate
from dispersion.core.errors import ConfigError, DataError, ModelError
from dispersion.core.ids import digest

EMBEDDED_DOMAINS = ("prose", "code")
FINAL = "final"
ADAPTER = "adapter"
SUCCESS = "_SUCCESS"

_COMMON_PAPER = dict(seq_len=2048, warmup_ratio=0.1, min_lr_ratio=0.0, weight_decay=0.0, betas=(0.9, 0.999),
                     eps=1e-8, grad_clip=1.0, seed=42, steps=None, eval_every=None, eval_batches=4)
PAPER_A2: dict[str, dict[str, Any]] = {
    "lora": dict(_COMMON_PAPER, lr=1e-4, batch_size=8, grad_accum=8, epochs=1.0),
    "full": dict(_COMMON_PAPER, lr=1e-5, batch_size=4, grad_accum=16, epochs=5.0),
}
_COMMON_EMBEDDED = dict(seq_len=128, warmup_ratio=0.1, min_lr_ratio=0.0, weight_decay=0.0, betas=(0.9, 0.999),
                        eps=1e-8, grad_clip=1.0, seed=42, epochs=None, batch_size=16, grad_accum=1,
                        eval_every=20, eval_batches=2)
EMBEDDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": dict(_COMMON_EMBEDDED, lr=1e-2, steps=60),
    "full": dict(_COMMON_EMBEDDED, lr=1e-3, steps=60),
}
HPARAMS = tuple(PAPER_A2["lora"])

# LoRA targets per naming scheme: (modules that must exist, attention targets, all-linear targets).
_LORA_SCHEMES = (
    ("gpt2", {"c_attn"}, ("attn.c_attn", "attn.c_proj"), ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}, ("q_proj", "k_proj", "v_proj", "o_proj"),
     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
)

FINETUNE_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),       # base model name (zoo name or id)
    pa.field("method", pa.string(), nullable=False),      # lora | full
    pa.field("domain", pa.string(), nullable=False),      # the text domain measured
    pa.field("role", pa.string(), nullable=False),        # target (fine-tuned on) | control
    pa.field("checkpoint", pa.string(), nullable=False),  # base | finetuned
    pa.field("ppl", pa.float64(), nullable=False),        # exp(total NLL / total tokens) over the segments
    pa.field("dispersion", pa.float64(), nullable=False), # mean pairwise cosine distance (Eq. 1), final layer, pooled
    pa.field("within", pa.float64(), nullable=False),     # mean within-segment token dispersion, final layer
    pa.field("n_segments", pa.int32(), nullable=False),
    pa.field("pool", pa.string(), nullable=False),        # last | mean
    pa.field("split", pa.string(), nullable=False),       # the split the segments come from
])


def _key(payload: object) -> str:
    return digest(payload, chars=24)


class FinetuneSpec(Strict):
    """One fine-tuning run (paper 001 §2.2(3)); see the module doc for the presets.

    Base: ``zoo`` (an embedded zoo model; ``revision`` defaults to its last checkpoint) or ``id``
    (local folder or hub id; ``revision`` defaults to ``main``). Data: ``domain`` ``prose`` or
    ``code`` of the embedded corpus (train on ``train``, evaluate on ``eval_splits``), or, with
    ``hf``, a dataset (``hf.split`` is trained on, ``eval_splits`` are its evaluation splits)
    and ``domain`` is its label. ``control``: the other embedded domain (``auto``), one named,
    or ``none``. Hyper-parameters left ``None`` come from the preset; give ``steps`` or
    ``epochs``, not both.
    """

    method: Literal["lora", "full"] = "lora"
    zoo: str | None = None
    id: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    domain: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] = "prose"
    hf: HFDatasetSource | None = None
    eval_splits: list[str] = ["validation", "test"]
    control: Literal["auto", "prose", "code", "none"] = "auto"
    preset: Literal["auto", "paper", "embedded"] = "auto"
    # training hyper-parameters (None: the preset's value)
    steps: Annotated[int, Field(gt=0)] | None = None
    epochs: Annotated[float, Field(gt=0)] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] | None = None
    grad_accum: Annotated[int, Field(gt=0)] | None = None
    seq_len: Annotated[int, Field(ge=8)] | None = None
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    weight_decay: Annotated[float, Field(ge=0)] | None = None
    betas: tuple[float, float] | None = None
    eps: Annotated[float, Field(gt=0)] | None = None
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    seed: int | None = None
    eval_every: Annotated[int, Field(gt=0)] | None = None
    eval_batches: Annotated[int, Field(gt=0)] | None = None
    save_at: list[Annotated[int, Field(ge=0)]] = []
    # LoRA (LLaMA-Factory defaults; the paper does not give them)
    lora_rank: Annotated[int, Field(gt=0)] = 8
    lora_alpha: Annotated[float, Field(gt=0)] | None = None  # None: 2 x rank
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Literal["attention", "all"] | list[str] = "attention"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> FinetuneSpec:
        if (self.zoo is None) == (self.id is None):
            raise ValueError("give exactly one of 'zoo' or 'id' (the base model)")
        if self.hf is None and self.domain not in EMBEDDED_DOMAINS:
            raise ValueError(f"domain: {self.domain!r} is not an embedded domain ('prose' or 'code'); "
                             f"give 'hf' for another dataset")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give 'steps' or 'epochs', not both")
        if not self.eval_splits:
            raise ValueError("eval_splits: must not be empty")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: must not be empty")
        return self

    @property
    def model_name(self) -> str:
        if self.zoo is not None:
            return self.zoo
        assert self.id is not None  # validated: exactly one of 'zoo' or 'id'
        return self.id

    @property
    def control_domain(self) -> str | None:
        if self.control == "none":
            return None
        if self.control == "auto":
            return next((d for d in EMBEDDED_DOMAINS if d != self.domain), None) if self.hf is None else None
        return None if (self.hf is None and self.control == self.domain) else self.control

    def hparams(self) -> dict[str, Any]:
        """The preset's hyper-parameters with this spec's explicit values on top."""
        preset = self.preset if self.preset != "auto" else ("embedded" if self.zoo is not None else "paper")
        out = dict((PAPER_A2 if preset == "paper" else EMBEDDED_DEFAULTS)[self.method])
        for name in HPARAMS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.steps is not None:
            out["epochs"] = None
        elif self.epochs is not None:
            out["steps"] = None
        out["preset"] = preset
        return out


def parse_finetune_spec(data: object, source: str = "finetune") -> FinetuneSpec:
    """A FinetuneSpec from a mapping (or a spec); errors are one line naming the field."""
    if isinstance(data, FinetuneSpec):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping, got {type(data).__name__}")
    return validate(FinetuneSpec, data, source)


# ----------------------------------------------------------------------------- base and data


def base_source(spec: FinetuneSpec, zoo: ZooSpec | None = None):
    """The ``ModelSource`` of the base model (a zoo model must be built)."""
    from dispersion.measure.modeling import resolve_source

    if spec.zoo is not None:
        from dispersion.measure.zoo_cache import zoo_revisions
        from dispersion.training.zoo import zoo_model_dir

        zoo = zoo or ZooSpec()
        root = zoo_model_dir(zoo.cache, spec.zoo)  # an unknown name is an error here
        revisions = zoo_revisions(zoo.cache, spec.zoo)
        rev = spec.revision or revisions[-1]
        return resolve_source(str(root), rev, field="finetune.zoo",
                              trust_remote_code=spec.trust_remote_code)
    assert spec.id is not None  # validated: exactly one of 'zoo' or 'id'
    return resolve_source(spec.id, spec.revision, field="finetune.id", trust_remote_code=spec.trust_remote_code)


def _eos_id(tok) -> int:
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    if eos is None:
        raise ModelError("finetune: the tokenizer has no eos (or bos) token to join documents with")
    return int(eos)


def _encode_docs(tok, texts: list[str], eos: int) -> np.ndarray:
    """Token ids of the documents, each followed by eos."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
    parts = [np.asarray(list(x) + [eos], dtype=np.int32) for x in ids]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _documents(spec: FinetuneSpec, domain: str, split: str) -> list:
    from dispersion.measure.corpus import embedded_documents, hf_documents

    if domain == spec.domain and spec.hf is not None:
        h = spec.hf
        return list(hf_documents(h.path, h.name, split, h.text_field, h.streaming, h.max_documents, h.group_rows,
                                 h.trust_remote_code))
    return embedded_documents(domain, split)


def finetune_tokens(spec: FinetuneSpec, tokenizer, zoo: ZooSpec | None = None):
    """``(train, eval)``: ``{domain: ids}`` of the training split and ``{(domain, split): ids}``
    of the evaluation splits of the domain and the control (zoo models: the zoo's cached
    token arrays; otherwise the documents tokenized with ``tokenizer``, joined by eos)."""
    domains = [spec.domain] + ([spec.control_domain] if spec.control_domain else [])
    train_split = spec.hf.split if spec.hf is not None else "train"
    cached = None
    if spec.zoo is not None and spec.hf is None:
        from dispersion.training.zoo import token_splits

        zoo = zoo or ZooSpec()
        cached = token_splits(zoo.cache, zoo.vocab_size)
    eos = None

    def ids(domain: str, split: str) -> np.ndarray:
        nonlocal eos
        if cached is not None and domain in EMBEDDED_DOMAINS:
            if split not in cached:
                raise DataError(f"finetune.eval_splits: split {split!r} is not in the zoo's token cache "
                                f"(has {sorted(cached)})")
            a, b = cached[split].domains[domain]
            return cached[split].ids[a:b]
        eos = _eos_id(tokenizer) if eos is None else eos
        docs = _documents(spec, domain, split)
        if not docs:
            raise DataError(f"finetune: no {split!r} documents for domain {domain!r}")
        return _encode_docs(tokenizer, [d.text for d in docs], eos)

    train = {spec.domain: ids(spec.domain, train_split)}
    evals = {(d, s): ids(d, s) for d in domains for s in spec.eval_splits}
    return train, evals


def train_spec(spec: FinetuneSpec, n_train_tokens: int):
    """The ``dispersion.training.train.TrainSpec`` of a fine-tuning run (epochs converted to steps)."""
    from dispersion.training.train import TrainSpec

    hp = spec.hparams()
    steps = hp["steps"]
    if steps is None:
        steps = max(1, math.ceil(hp["epochs"] * n_train_tokens / (hp["batch_size"] * hp["grad_accum"] * hp["seq_len"])))
    return validate(TrainSpec, dict(
        steps=steps, batch_size=hp["batch_size"], seq_len=hp["seq_len"], grad_accum=hp["grad_accum"], lr=hp["lr"],
        min_lr_ratio=hp["min_lr_ratio"], warmup_steps=math.ceil(hp["warmup_ratio"] * steps),
        weight_decay=hp["weight_decay"], betas=hp["betas"], eps=hp["eps"], grad_clip=hp["grad_clip"],
        eval_every=hp["eval_every"], eval_batches=hp["eval_batches"], save_at=spec.save_at, seed=hp["seed"],
        device=spec.device, dtype=spec.dtype), "finetune")


# ----------------------------------------------------------------------------- LoRA


def lora_targets(model, which: str | list[str] = "attention") -> tuple[list[str], bool]:
    """``(target module names, fan_in_fan_out)`` for ``peft``: GPT-2 (``Conv1D`` layers, hence
    ``fan_in_fan_out``) and Llama-style projections; an explicit list is checked to match."""
    from torch import nn

    leaves: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            leaves[name] = type(module).__name__
    if isinstance(which, list):
        targets = which
    else:
        short = {n.rsplit(".", 1)[-1] for n in leaves}
        scheme = next((s for s in _LORA_SCHEMES if s[1] <= short), None)
        if scheme is None:
            raise ModelError(f"finetune.target_modules: no known attention projections in {type(model).__name__} "
                             f"(give the module names as a list)")
        targets = list(scheme[2] if which == "attention" else scheme[3])
    matched = {t: [n for n in leaves if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, ms in matched.items() if not ms]
    if missing:
        raise ModelError(f"finetune.target_modules: {missing} match no linear layer of {type(model).__name__}")
    conv1d = {leaves[n] == "Conv1D" for ms in matched.values() for n in ms}
    if len(conv1d) > 1:
        raise ModelError("finetune.target_modules: mixes Conv1D and Linear layers (give one kind)")
    return targets, conv1d == {True}


def apply_lora(model, spec: FinetuneSpec):
    """Wrap ``model`` with a fresh LoRA adapter (``peft``); only the adapter is trainable."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets, fan_in_fan_out = lora_targets(model, spec.target_modules)
    # peft annotates lora_alpha as int; it only divides by r, and a float alpha is allowed here
    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha or 2 * spec.lora_rank,  # type: ignore[arg-type]
                        lora_dropout=spec.lora_dropout, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes on peft's calls
        torch.manual_seed(spec.hparams()["seed"])  # the adapter's random init (lora_A)
        return get_peft_model(model, config)


def _save_merged(model, folder: Path) -> None:
    """A checkpoint's loadable model: a merged copy of the peft model (the original keeps training)."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(folder)


# ----------------------------------------------------------------------------- fine-tuning




def _tokenizer_files(source) -> Path | None:
    """The local folder holding the base's tokenizer files (copied into checkpoints), if any."""
    if source.local and (Path(source.location) / "tokenizer_config.json").exists():
        return Path(source.location)
    return None


def finetune(spec: FinetuneSpec | dict, out_dir: str | os.PathLike, *, zoo: ZooSpec | None = None,
             progress: bool = False, restart_stale: bool = False) -> Path:
    """Fine-tune the base model of ``spec`` on its domain; returns ``{out_dir}/{method}/final``
    (a plain model folder, LoRA merged). See the module doc for the layout. The run is keyed by
    the base model's name, revision and weights (not the path it is reached by), the spec and
    the training settings; ``restart_stale``: checkpoints of another key in ``out_dir`` are
    removed instead of refused (:func:`dispersion.training.train.train`)."""
    from dispersion.core.folders import publishing, read_marker
    from dispersion.measure.modeling import load_model, load_tokenizer, quiet_transformers, source_fingerprint
    from dispersion.training.train import train

    spec = parse_finetune_spec(spec)
    t0 = time.perf_counter()
    base = base_source(spec, zoo)
    root = Path(out_dir).expanduser().absolute() / spec.method
    final = root / FINAL
    tokenizer = load_tokenizer(base, field="finetune.zoo" if spec.zoo else "finetune.id")
    train_tokens, eval_tokens = finetune_tokens(spec, tokenizer, zoo)
    tspec = train_spec(spec, int(train_tokens[spec.domain].size))
    run_key = {"base": [spec.model_name, base.revision], "fingerprint": source_fingerprint(base),
               "spec": spec.model_dump(mode="json", exclude={"device", "eval_every", "eval_batches", "save_at",
                                                             "eval_splits", "control"}),
               "train": tspec.weights_key("")}
    key = _key(run_key)
    if read_marker(final) == key:
        return final

    with quiet_transformers():
        model = load_model(base, dtype="float32", field="finetune.zoo" if spec.zoo else "finetune.id")
        n_params = sum(p.numel() for p in model.parameters())
        if spec.method == "lora":
            model = apply_lora(model, spec)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tok_src = _tokenizer_files(base) or tokenizer
        result = train(model, train_tokens, tspec, out_dir=root, eval_tokens=eval_tokens, tokenizer=tok_src,
                       export=_save_merged if spec.method == "lora" else None, run_key=run_key, progress=progress,
                       restart_stale=restart_stale)
        if spec.method == "lora":
            with publishing(root / ADAPTER) as adapter:
                model.save_pretrained(adapter)
            model = model.merge_and_unload()
        with publishing(final, key) as tmp:
            model.save_pretrained(tmp)
            if isinstance(tok_src, Path):
                from dispersion.training.checkpoints import copy_tokenizer

                copy_tokenizer(tok_src, tmp)
            else:
                tok_src.save_pretrained(tmp)
            mode = (tmp / "config.json").stat().st_mode & 0o777
            for f in tmp.iterdir():
                os.chmod(f, mode)
            evals = [r for r in result.history if r["kind"] == "eval"]
            trains = [r for r in result.history if r["kind"] == "train"]
            summary = {
                "key": key, "spec": spec.model_dump(mode="json"), "base": base.describe(),
                "hparams": spec.hparams(), "train": tspec.model_dump(mode="json"),
                "n_params": n_params, "n_trainable": n_trainable,
                "train_tokens": int(train_tokens[spec.domain].size),
                "first_loss": trains[0]["loss"] if trains else None, "final_loss": result.final_loss,
                "ppl_before": {f"{r['domain']}/{r['split']}": r["ppl"] for r in evals if r["step"] == 0},
                "ppl_after": {f"{d}/{s}": p for (d, s), p in result.eval.items()},
                "checkpoints": sorted(result.checkpoints), "resumed_from": result.resumed_from,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            (tmp / "finetune.json").write_text(json.dumps(summary, indent=1) + "\n")
    return final


# ----------------------------------------------------------------------------- before / after


def dispersion_before_after(spec: FinetuneSpec | dict, finetuned: str | os.PathLike, *, zoo: ZooSpec | None = None,
                            num_segments: int = 256, segment_length: int = 64, split: str = "validation",
                            pool: Literal["last", "mean"] = "last", seed: int = 0, batch_size: int = 16,
                            device: str = "auto") -> pa.Table:
    """Perplexity and final-layer dispersion of the base and the fine-tuned model on the
    fine-tuning domain and the control domain (a :data:`FINETUNE_SCHEMA` table, one row per
    checkpoint x domain). Both models see the same ``num_segments`` segments of
    ``segment_length`` tokens per domain (``sampling.sample_segments`` on ``split``), extracted
    with ``extract.Extractor`` (layer ``final``, BOS prepended) and measured with
    ``metrics.cosine_dispersion`` (``dispersion``, over the ``pool``-ed states) and the mean of
    the within-segment token dispersions (``within``)."""
    import torch

    from dispersion.measure.capture import resolve_bos
    from dispersion.measure.extract import Extractor
    from dispersion.measure.metrics import cosine_dispersion
    from dispersion.measure.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
    from dispersion.measure.sampling import sample_segments, tokenizer_fingerprint

    spec = parse_finetune_spec(spec)
    base = base_source(spec, zoo)
    tuned = resolve_source(str(finetuned), None, field="finetune.finetuned")
    field = "finetune.zoo" if spec.zoo else "finetune.id"
    tok = load_tokenizer(base, field=field)
    bos = resolve_bos(tok, field)  # BOS, else EOS
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    roles = [(spec.domain, "target")] + ([(spec.control_domain, "control")] if spec.control_domain else [])
    segments = {}
    for domain, _ in roles:
        docs = _documents(spec, domain, split)
        table = sample_segments(docs, tok, length=segment_length, num_segments=num_segments, seed=seed,
                                dataset_key=f"finetune:{domain}:{split}:{tokenizer_fingerprint(tok)}",
                                dataset_name=domain)
        segments[domain] = [np.asarray(t, np.int32) for t in table.column("token_ids").to_pylist()]
    dev = resolve_device(device)
    rows = []
    for checkpoint, source in (("base", base), ("finetuned", tuned)):
        model = load_model(source, dtype=resolve_dtype("auto", dev), device=dev, field=f"finetune.{checkpoint}")
        ex = Extractor(model, layers=["final"], sites=["block"], pools=[pool], prepend_bos=True, bos_token_id=bos,
                       batch_size=batch_size, pad_token_id=pad)
        for domain, role in roles:
            res = ex.extract(segments[domain])
            within = res.within[("final", "block")]
            rows.append({"model": spec.model_name, "method": spec.method, "domain": domain, "role": role,
                         "checkpoint": checkpoint,
                         "ppl": float(np.exp(res.features["nll_sum"].sum() / res.features["n_scored"].sum())),
                         "dispersion": cosine_dispersion(res.vectors[("final", "block", pool)]),
                         "within": float(np.nanmean(within)) if np.isfinite(within).any() else float("nan"),
                         "n_segments": len(segments[domain]), "pool": pool, "split": split})
        del ex, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return pa.Table.from_pylist(rows, schema=FINETUNE_SCHEMA)


@dataclass(frozen=True)
class FinetuneRun:
    """One entry of the ``finetune`` analysis step: fine-tune ``spec`` into ``out`` (a local
    folder keyed by the base weights and the spec; the entry's folders of older keys, siblings
    named ``{stem}`` or ``{stem}-{key}``, are removed) and measure base and fine-tuned model
    (:func:`dispersion_before_after` with these settings)."""

    spec: FinetuneSpec
    out: str
    stem: str
    zoo: ZooSpec
    num_segments: int
    segment_length: int
    pool: Literal["last", "mean"]
    seed: int
    batch_size: int
    device: str

    def key(self) -> str:
        """What changes the numbers (the base weights are the unit's own fingerprint; where the
        fine-tuned model is kept does not count)."""
        return digest({"spec": self.spec.model_dump(mode="json"), "segments": self.num_segments,
                       "length": self.segment_length, "pool": self.pool, "seed": self.seed})


def finetune_and_measure(base: Any, run: FinetuneRun) -> pa.Table:
    """The ``finetune`` step's measurement (a :class:`dispersion.measure.units.TableUnit` whose
    model is the base ``ModelSource``): fine-tune (resumable; skipped when the folder is
    complete), then the :data:`FINETUNE_SCHEMA` rows of base and fine-tuned model."""
    import shutil

    out = Path(run.out)
    for old in [out.parent / run.stem, *out.parent.glob(f"{run.stem}-*")]:
        if old != out and old.is_dir() and len(old.name) - len(run.stem) in (0, 13):
            shutil.rmtree(old, ignore_errors=True)
    final = finetune(run.spec, out, zoo=run.zoo, restart_stale=True)  # the folder is keyed by base and spec
    return dispersion_before_after(run.spec, final, zoo=run.zoo, num_segments=run.num_segments,
                                   segment_length=run.segment_length, pool=run.pool, seed=run.seed,
                                   batch_size=run.batch_size, device=run.device)



def figure_finetune(table: pa.Table) -> bytes:
    """Bar charts of dispersion, within-segment dispersion and perplexity, base vs fine-tuned
    (one bar per method), per domain (paper 001 Fig. 6). PNG bytes with the same figure as SVG
    (:class:`dispersion.report.figures.FigureBytes`)."""
    from dispersion.report.figures import Figure, category_colors

    rows = table.to_pylist()
    if not rows:
        raise DataError("plot_finetune: the table is empty")
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    roles = {r["domain"]: r["role"] for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    bars = ["base"] + [m for m in dict.fromkeys(r["method"] for r in rows)]

    def value(model, domain, bar, metric):
        sel = [r for r in rows if r["model"] == model and r["domain"] == domain
               and (r["checkpoint"] == "base" if bar == "base"
                    else (r["checkpoint"] == "finetuned" and r["method"] == bar))]
        return sel[0][metric] if sel else float("nan")

    metrics = [("dispersion", "dispersion", "avg pairwise cosine distance"),
               ("within", "within-segment dispersion", "within-segment dispersion"),
               ("ppl", "perplexity", "perplexity (log scale)")]
    fig = Figure(len(models), len(metrics), width=3.2, height=2.8)
    width = 0.8 / len(bars)
    colors = {"base": "#9e9e9e", **{b: c for b, c in category_colors(bars[1:]).items()}}
    for i, model in enumerate(models):
        for j, (metric, title, ylabel) in enumerate(metrics):
            ax = fig.ax(i, j)
            for k, bar in enumerate(bars):
                xs = np.arange(len(domains)) + (k - (len(bars) - 1) / 2) * width
                ax.bar(xs, [value(model, d, bar, metric) for d in domains], width,
                       label="base model" if bar == "base" else f"fine-tuned ({bar})", color=colors[bar])
            ax.set_xticks(np.arange(len(domains)), [f"{d}\n({roles[d]})" for d in domains])
            fig.style(ax, f"{model}: {title}", "domain (role)", ylabel, logy=metric == "ppl")
    fig.legend()
    return fig.render("Fine-tuning: dispersion and perplexity before and after")


def plot_finetune(table: pa.Table, path: str | os.PathLike) -> str:
    """:func:`figure_finetune` written to ``path``, a local path or fsspec URL (PNG; SVG when
    it ends in ``.svg``)."""
    from dispersion.report.figures import write_figure

    return write_figure(figure_finetune(table), path)
