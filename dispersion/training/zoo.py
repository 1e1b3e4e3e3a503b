"""The embedded model zoo: a local tokenizer and tiny decoder LMs trained on the embedded corpus.

These are the default models of the main job and a stand-in for a real checkpoint trajectory
(OLMo-style revisions ``step{N}``). Everything is built locally, offline, in a few minutes on
a laptop CPU, and reused afterwards:

* ``build_tokenizer``: byte-level BPE trained with ``tokenizers`` on the ``train`` split of
  both embedded domains (``prose`` and ``code``). ``<|endoftext|>`` is bos, eos and pad; the
  post-processor adds no special tokens (the extractor prepends BOS itself).
* ``build_zoo``: tokenizes the corpus once (cached as ``tokens-{split}.npy``), then trains each
  model of ``ZOO_MODELS`` with the project's trainer (``dispersion.training.train.train``, the loop the
  dispersion-loss sweeps use; :func:`zoo_train_spec` gives its settings) and keeps the
  checkpoints listed in ``ZooSpec.checkpoints``.

Cache layout (``ZooSpec.cache``, relative paths are relative to the working directory)::

    {cache}/tokenizer/                 tokenizer files + _SUCCESS
    {cache}/tokens-train.npy           int32 token ids of the train split (docs joined by eos)
    {cache}/tokens-validation.npy      same for the validation split (and tokens-test.npy)
    {cache}/tokens.json                tokenizer key + per-domain [start, end) ranges
    {cache}/{name}/step{N}/            config.json, model.safetensors, tokenizer files
    {cache}/{name}/train_log.json      per checkpoint: step, losses, tokens seen, seconds
    {cache}/{name}/metrics.jsonl       the trainer's log (every step; evaluations at checkpoints)
    {cache}/{name}/_SUCCESS            hash of everything that changes the weights

A model trains in a hidden sibling ``.build-{name}-{key}`` and is renamed into place only when
complete, so nothing half-built is ever visible; a crashed build resumes from its newest
checkpoint there, and a rebuild skips models whose ``_SUCCESS`` matches.
``transformers`` and ``torch`` are imported lazily (importing this module is cheap).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dispersion.core.config import ZooSpec
from dispersion.core.errors import ConfigError, ModelError
from dispersion.core.folders import SUCCESS, cache_root, clean_stale_tmp, install_folder, publishing, read_marker
from dispersion.core.ids import digest
from dispersion.core.threads import set_torch_threads
from dispersion.measure.modeling import quiet_transformers
from dispersion.measure.zoo_cache import zoo_model_dir as cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"
DOMAINS = ("prose", "code")
TOKENIZER_DIR = "tokenizer"
# Bump when the build procedure changes in a way that changes the artifacts.
ZOO_FORMAT = 2  # models; 2: trained by dispersion.training.train (equal rows per domain)
TOKENIZER_FORMAT = 1


def _key(payload: object) -> str:
    return digest(payload, chars=32)


@dataclass(frozen=True)
class ZooRecipe:
    """Architecture and learning rate of one zoo model; ``recipe(vocab_size)`` gives its config.

    ``d_ff=None`` means ``4 * d_model``. ``context`` is ``n_positions`` /
    ``max_position_embeddings``.
    """

    arch: Literal["gpt2", "llama"]
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int | None = None
    tie_embeddings: bool = True
    lr: float = 3e-3
    context: int = 256

    def config(self, vocab_size: int, bos_token_id: int = 0, eos_token_id: int = 0,
               pad_token_id: int | None = 0) -> PretrainedConfig:
        """A ``transformers`` config for this recipe and vocabulary (special ids default to 0)."""
        if self.arch == "gpt2":
            from transformers import GPT2Config

            return GPT2Config(vocab_size=vocab_size, n_positions=self.context, n_embd=self.d_model,
                              n_layer=self.n_layer, n_head=self.n_head, n_inner=self.d_ff,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              tie_word_embeddings=self.tie_embeddings,
                              bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if self.arch == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=self.context,
                               hidden_size=self.d_model, num_hidden_layers=self.n_layer,
                               num_attention_heads=self.n_head, num_key_value_heads=self.n_head,
                               intermediate_size=self.d_ff or 4 * self.d_model,
                               tie_word_embeddings=self.tie_embeddings,
                               bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        raise ModelError(f"zoo: unknown architecture {self.arch!r}")

    __call__ = config


# Learning rates tuned on the default ZooSpec (300 steps of 16 x 128 tokens, vocab 4096).
ZOO_MODELS: dict[str, ZooRecipe] = {
    "gpt2-tiny": ZooRecipe(arch="gpt2", n_layer=2, d_model=64, n_head=4, lr=5e-3),
    "llama-small": ZooRecipe(arch="llama", n_layer=4, d_model=128, n_head=4, d_ff=344, lr=3e-3),
    "gpt2-small": ZooRecipe(arch="gpt2", n_layer=4, d_model=128, n_head=4, lr=3e-3),
}
# What ``build_zoo(spec)`` builds when no names are given (the models the default configs scan);
# ``gpt2-small`` is built on request, by name.
DEFAULT_ZOO: tuple[str, ...] = ("gpt2-tiny", "llama-small")

# ----------------------------------------------------------------------------- helpers




def _corpus_key() -> str:
    # The embedded corpus is the stdlib of the running Python (see dispersion.measure.corpus).
    # The stdlib of the running Python, split train / validation / test by these shares.
    from dispersion.measure.corpus import TEST_SHARE, VALIDATION_SHARE

    return f"embedded:val{VALIDATION_SHARE}:test{TEST_SHARE}:py{sys.version_info[0]}.{sys.version_info[1]}"


def _recipe(name: str) -> ZooRecipe:
    try:
        return ZOO_MODELS[name]
    except KeyError:
        raise ModelError(f"zoo: unknown model {name!r} (known: {', '.join(ZOO_MODELS)})") from None


def _check_spec(spec: ZooSpec, recipe: ZooRecipe | None = None) -> list[int]:
    """Sorted unique checkpoints; errors for impossible combinations."""
    ckpts = sorted(set(spec.checkpoints))
    if not ckpts:
        raise ConfigError("zoo.checkpoints: must not be empty")
    if ckpts[-1] > spec.train_steps:
        raise ConfigError(f"zoo.checkpoints: step {ckpts[-1]} is beyond train_steps {spec.train_steps}")
    if ckpts[-1] != spec.train_steps:
        raise ConfigError(f"zoo.checkpoints: the last checkpoint must be train_steps ({spec.train_steps}): "
                          f"a zoo model trains to the end of its schedule, got {ckpts[-1]}")
    if recipe is not None and spec.seq_len > recipe.context:
        raise ConfigError(f"zoo.seq_len: {spec.seq_len} exceeds the zoo context length {recipe.context}")
    return ckpts


@contextlib.contextmanager
def _torch_threads():
    import torch

    before = torch.get_num_threads()
    set_torch_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_key(vocab_size: int) -> str:
    return _key({"format": TOKENIZER_FORMAT, "vocab_size": vocab_size, "corpus": _corpus_key(),
                    "special": SPECIAL_TOKEN})


def _train_texts(split: str) -> list[str]:
    from dispersion.measure.corpus import embedded_documents

    return [d.text for dom in DOMAINS for d in embedded_documents(dom, split)]


def build_tokenizer(cache: str | os.PathLike, vocab_size: int) -> Path:
    """Train (if missing) the zoo's byte-level BPE tokenizer; returns ``{cache}/tokenizer``.

    Trained on the ``train`` split of both embedded domains. ``<|endoftext|>`` (id 0) is bos,
    eos and pad; no special token is added automatically. Loadable with
    ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    cache = cache_root(cache)
    final = cache / TOKENIZER_DIR
    key = tokenizer_key(vocab_size)
    if read_marker(final) == key:
        return final
    t0 = time.perf_counter()
    texts = _train_texts("train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS/EOS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))

    from transformers import PreTrainedTokenizerFast

    context = max(r.context for r in ZOO_MODELS.values())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN,
                                   pad_token=SPECIAL_TOKEN, unk_token=None, model_max_length=context,
                                   add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
    with publishing(final, key) as tmp:
        fast.save_pretrained(tmp)
        # transformers 5 writes its own class name; the generic one also loads with transformers 4.
        cfg_path = tmp / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text())
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    log.info("zoo: tokenizer (vocab %d) trained in %.1f s", vocab_size, time.perf_counter() - t0)
    return final


def load_raw_tokenizer(tok_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


# ----------------------------------------------------------------------------- token arrays


@dataclass(frozen=True)
class TokenSplit:
    """Token ids of one split (documents joined by eos) and each domain's [start, end) range."""

    ids: np.ndarray
    domains: dict[str, tuple[int, int]]


def _tokenize_split(tok, split: str, eos_id: int) -> TokenSplit:
    from dispersion.measure.corpus import embedded_documents

    parts: list[np.ndarray] = []
    domains: dict[str, tuple[int, int]] = {}
    pos = 0
    for dom in DOMAINS:
        texts = [d.text for d in embedded_documents(dom, split)]
        start = pos
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            arr = np.empty(len(enc.ids) + 1, dtype=np.int32)
            arr[:-1] = enc.ids
            arr[-1] = eos_id
            parts.append(arr)
            pos += len(arr)
        domains[dom] = (start, pos)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return TokenSplit(ids, domains)


def token_splits(cache: str | os.PathLike, vocab_size: int) -> dict[str, TokenSplit]:
    """``{'train': ..., 'validation': ..., 'test': ...}`` token arrays, tokenized once and cached as .npy."""
    cache = cache_root(cache)
    tok_dir = build_tokenizer(cache, vocab_size)
    key = read_marker(tok_dir)
    meta_path = cache / "tokens.json"
    splits = ("train", "validation", "test")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("tokenizer") == key:
            return {s: TokenSplit(np.load(cache / f"tokens-{s}.npy"),
                                  {d: tuple(r) for d, r in meta["domains"][s].items()}) for s in splits}
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.perf_counter()
    tok = load_raw_tokenizer(tok_dir)
    eos_id = tok.token_to_id(SPECIAL_TOKEN)
    out = {s: _tokenize_split(tok, s, eos_id) for s in splits}
    meta_path.unlink(missing_ok=True)  # the .json is the marker: write it last
    for s, ts in out.items():
        tmp = cache / f".tmp-tokens-{s}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        with open(tmp, "wb") as fh:
            np.save(fh, ts.ids)
        os.replace(tmp, cache / f"tokens-{s}.npy")
    meta = {"tokenizer": key, "domains": {s: {d: list(r) for d, r in ts.domains.items()} for s, ts in out.items()},
            "n_tokens": {s: int(ts.ids.size) for s, ts in out.items()}}
    tmp = cache / f".tmp-tokens-json-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    log.info("zoo: tokenized corpus (%s tokens) in %.1f s",
             ", ".join(f"{s} {ts.ids.size}" for s, ts in out.items()), time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- public queries


def model_key(spec: ZooSpec, name: str) -> str:
    """Hash of the recipe and every ZooSpec field that changes the model's weights."""
    recipe = _recipe(name)
    return _key({"format": ZOO_FORMAT, "name": name, "recipe": asdict(recipe),
                    "train": zoo_train_spec(spec, name).weights_key("float32"),
                    "spec": spec.model_dump(exclude={"cache", "checkpoints"}),
                    "checkpoints": sorted(set(spec.checkpoints)), "tokenizer": tokenizer_key(spec.vocab_size)})


def zoo_model_dir(cache: str | os.PathLike, name: str) -> Path:
    """``{cache}/{name}`` of a known zoo model (unknown names are a ModelError)."""
    _recipe(name)
    return cache_dir(cache, name)


def zoo_is_built(spec: ZooSpec, name: str) -> bool:
    """True when the model is complete and was built from this recipe and ZooSpec."""
    return read_marker(zoo_model_dir(spec.cache, name)) == model_key(spec, name)


# ----------------------------------------------------------------------------- training


def zoo_train_spec(spec: ZooSpec, name: str):
    """The :class:`dispersion.training.train.TrainSpec` a zoo model is trained with: ``spec.train_steps``
    updates of ``batch_size`` x ``seq_len`` tokens (rows split equally between the domains),
    the recipe's peak learning rate, warm-up over the first 10 %, cosine to 10 %, AdamW
    (0.9, 0.95), weight decay 0.1, clipping at 1; fp32 on the CPU (bit-reproducible); an
    evaluation and a checkpoint at every step of ``spec.checkpoints``."""
    from dispersion.training.train import TrainSpec

    recipe = _recipe(name)
    return TrainSpec(steps=spec.train_steps, batch_size=spec.batch_size, seq_len=spec.seq_len, lr=recipe.lr,
                     min_lr_ratio=0.1, warmup_steps=max(1, spec.train_steps // 10), weight_decay=0.1,
                     betas=(0.9, 0.95), grad_clip=1.0, eval_batches=1, save_at=sorted(set(spec.checkpoints)),
                     seed=spec.seed, device="cpu", dtype="float32")


def _train_model(name: str, spec: ZooSpec, tokens: dict[str, TokenSplit], tok_dir: Path, out: Path,
                 progress: bool) -> dict[str, Any]:
    """Train one model with ``dispersion.training.train.train`` into ``out`` (``step{N}`` at each
    checkpoint, ``metrics.jsonl``; an interrupted build resumes there) and return the train log."""
    import torch
    from transformers import AutoModelForCausalLM

    from dispersion.training.train import train

    recipe = _recipe(name)
    tok = load_raw_tokenizer(tok_dir)
    special = tok.token_to_id(SPECIAL_TOKEN)
    config = recipe.config(tok.get_vocab_size(), special, special, special)
    tspec = zoo_train_spec(spec, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    data = {d: tokens["train"] for d in DOMAINS}
    evals = {(d, s): tokens[s] for d in DOMAINS for s in ("validation", "train")}
    result = train(model, data, tspec, out_dir=out, eval_tokens=evals, tokenizer=str(tok_dir),
                   run_key={"zoo": name, "recipe": asdict(recipe), "tokenizer": tokenizer_key(spec.vocab_size)},
                   progress=progress)
    evals_at: dict[int, dict[tuple[str, str], float]] = {}
    trained: dict[int, dict] = {}
    for r in result.history:
        if r["kind"] == "eval":
            evals_at.setdefault(r["step"], {})[(r["domain"], r["split"])] = r["loss"]
        else:
            trained[r["step"]] = r
    records = []
    for step in tspec.save_at:
        losses = evals_at[step]
        by_dom = {d: losses[(d, "validation")] for d in DOMAINS}
        records.append({"step": step, "train_loss": float(np.mean([losses[(d, "train")] for d in DOMAINS])),
                        "val_loss": float(np.mean(list(by_dom.values()))), "val_loss_by_domain": by_dom,
                        "tokens_seen": step * tspec.batch_size * tspec.seq_len,
                        "seconds": trained[step]["seconds"] if step in trained else 0.0,
                        "lr": trained[step]["lr"] if step in trained else 0.0})
    return {"name": name, "recipe": asdict(recipe), "spec": spec.model_dump(mode="json"),
            "train": tspec.model_dump(mode="json"), "architecture": type(model).__name__,
            "n_params": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size,
            "train_tokens": int(tokens["train"].ids.size), "seconds": round(result.seconds, 3),
            "resumed_from": result.resumed_from, "checkpoints": records}


def _export_checkpoints(folder: Path) -> None:
    """Drop the trainer's resume state from a finished build: the zoo publishes models only."""
    from dispersion.training.checkpoints import OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE

    for step_dir in folder.glob("step*"):
        for name in (OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE):
            (step_dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _cache_lock(cache: Path):
    """An exclusive lock on the cache folder while anything is built in it: two processes
    (a scan and a sweep, say) never train into the same build folder; the second waits and
    then finds the model built."""
    import fcntl

    fd = os.open(cache, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.monotonic()
            log.warning("zoo: waiting for the build lock on %s (another process is building zoo models there)",
                        cache)
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.warning("zoo: got the build lock on %s after %.0f s", cache, time.monotonic() - t0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_dir(cache: Path, name: str, key: str) -> Path:
    """``{cache}/.build-{name}-{key}``: where a model trains until it is installed. It outlives
    a crash so the next build resumes from its newest checkpoint; builds of an older key are
    removed."""
    for old in cache.glob(f".build-{name}-*"):
        if old.name != f".build-{name}-{key}":
            shutil.rmtree(old, ignore_errors=True)
    return cache / f".build-{name}-{key}"


def build_zoo(spec: ZooSpec, names: list[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Build the tokenizer and each named zoo model (``DEFAULT_ZOO`` by default) if missing.

    Returns ``{name: model root folder}``; each root holds ``step{N}/`` for N in
    ``spec.checkpoints``. Models already built from the same recipe and spec are skipped.
    """
    names = list(DEFAULT_ZOO) if names is None else list(dict.fromkeys(names))
    for n in names:
        _check_spec(spec, _recipe(n))
    cache = cache_root(spec.cache)
    out: dict[str, Path] = {}
    todo = []
    for n in names:
        out[n] = cache / n
        if zoo_is_built(spec, n):
            log.debug("zoo: %s is built (%s), skipping", n, out[n])
        else:
            todo.append(n)
    if not todo:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache), _torch_threads(), quiet_transformers():
        clean_stale_tmp(cache)
        tok_dir = build_tokenizer(cache, spec.vocab_size)
        tokens = token_splits(cache, spec.vocab_size)
        for n in todo:
            if zoo_is_built(spec, n):  # another process built it while this one waited
                continue
            key = model_key(spec, n)
            build = _build_dir(cache, n, key)
            log.info("zoo: training %s (%d of %d to build, %d steps)", n, todo.index(n) + 1, len(todo),
                     spec.train_steps)
            train_log = _train_model(n, spec, tokens, tok_dir, build, progress)
            train_log["key"] = key
            _export_checkpoints(build)
            (build / "train_log.json").write_text(json.dumps(train_log, indent=1))
            (build / SUCCESS).write_text(key + "\n")
            install_folder(build, out[n], key)
            c = train_log["checkpoints"]
            log.info("zoo: %s trained in %.1f s, val loss %s", n, train_log["seconds"],
                     " -> ".join(f"{r['val_loss']:.3f}" for r in c))
    return out
