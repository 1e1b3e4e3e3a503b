"""Loading models and tokenizers: a local folder, a local checkpoint sub-folder, or a hub id
at a revision. Weights only through safetensors; ``trust_remote_code`` only when asked.

Resolution of (``id``, ``revision``):

* ``id`` is an existing local folder: ``revision`` ``main`` (or ``None``) loads the folder
  itself; any other revision loads ``id/revision`` (the OLMo-style ``stepN`` layout the
  zoo writes), and a missing sub-folder is an error listing the ones present;
* otherwise ``id`` is a hub model id and ``revision`` a branch, tag or commit
  (``stepN`` for OLMo's intermediate checkpoints), passed to ``from_pretrained``.

:func:`read_output_embeddings` reads one tensor (the output embedding) from a model's
safetensors files, local or on the hub, without loading the model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispersion.core.errors import ModelError
from dispersion.core.ids import digest, step_of
from dispersion.core.overrides import looks_like_path

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model@revision is loaded from: a local folder or (hub id, revision)."""

    location: str
    revision: str | None
    local: bool
    trust_remote_code: bool = False

    def describe(self) -> str:
        return self.location if self.local else f"{self.location}@{self.revision}"




def resolve_source(model_id: str, revision: str | None, *, field: str = "id",
                   trust_remote_code: bool = False) -> ModelSource:
    """Resolve a configured model id and revision to a loadable source (see module doc)."""
    if looks_like_path(model_id):
        root = Path(os.path.expanduser(model_id))
        if not root.is_dir():
            raise ModelError(f"{field}: no such model folder {model_id!r}")
        if revision in (None, "main"):
            path = root
        else:
            path = root / revision
            if not path.is_dir():
                present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
                raise ModelError(f"{field}: revision {revision!r} not found under {model_id!r} "
                                 f"(present: {', '.join(present) or 'none'})")
        if not (path / "config.json").is_file():
            inside = sorted((p.name for p in path.iterdir() if (p / "config.json").is_file()),
                            key=lambda n: (step_of(n) is None, step_of(n) or 0, n))
            if inside:  # a folder of checkpoints, named without one
                shown = ", ".join(inside[:6]) + (f", ... ({len(inside)} in all)" if len(inside) > 6 else "")
                raise ModelError(f"{field}: {str(path)!r} holds checkpoint folders ({shown}), not a model: "
                                 f"name the revisions to scan (for example revisions: [{inside[-1]}] in a config, "
                                 f"@{inside[-1]} after the model on the command line)")
            raise ModelError(f"{field}: {str(path)!r} has no config.json (not a model folder)")
        return ModelSource(str(path), None, True, trust_remote_code)
    return ModelSource(model_id, revision or "main", False, trust_remote_code)


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be asked now (``None``: it can): ``HF_HUB_OFFLINE`` is set, or its
    endpoint (``HF_ENDPOINT``, default huggingface.co) does not accept a connection within a
    few seconds. Behind a proxy (``HTTPS_PROXY``) the hub is taken as reachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as err:
        return f"{host}:{port} is not reachable ({err.strerror or type(err).__name__})"
    return None


HUB_PROBE_SECONDS = 3.0


def check_hub_source(source: ModelSource, field: str = "id") -> None:
    """Fail at once, in one line, when a hub model can be neither read from the local hub
    cache nor downloaded (offline): instead of the retries of every later hub call."""
    if source.local:
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source.location, "config.json", revision=source.revision)
    except Exception:  # noqa: BLE001 - an id the cache cannot even name: the hub decides
        cached = None
    if isinstance(cached, str):
        return
    reason = _hub_offline_reason()
    if reason is None:
        return
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ModelError(f"{field}: {source.describe()!r} is not a local folder, not in the hub cache ({HF_HUB_CACHE}) "
                     f"and the hub cannot be asked ({reason}); download it where there is a network "
                     f"(hf download {source.location} --revision {source.revision} --local-dir DIR) and give "
                     f"the folder (--model NAME=DIR), or set HF_HOME to a cache that holds it")


def source_fingerprint(source: ModelSource) -> str:
    """What identifies the weights, for work-unit keys.

    Local folder: a hash of ``config.json`` and the name, size and mtime of every weight
    file, so re-trained or copied-over weights are extracted again. Hub id: the commit sha
    the revision resolves to (a moving ``main`` gives a new key); when the hub cannot be
    asked (offline), the revision name.
    """
    if source.local:
        root = Path(source.location)
        files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.iterdir())
                 if f.suffix in (".safetensors", ".bin") and f.is_file()]
        return digest({"config": (root / "config.json").read_text(), "weights": files}, chars=20)
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(source.location, revision=source.revision).sha
    except Exception:  # offline, gated, or unknown: the revision name is all there is
        sha = None
    return f"{source.revision}@{sha}" if sha else str(source.revision)


def _from_pretrained(factory, source: ModelSource, field: str, **kwargs):
    try:
        return factory.from_pretrained(source.location, revision=source.revision,
                                       trust_remote_code=source.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{field}: cannot load {source.describe()!r}: {first}") from None


_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def check_weights(source: ModelSource, field: str = "id") -> None:
    """Fail, naming ``field``, when the weights are not there in the one format
    :func:`load_model` reads (safetensors): before a scan samples or publishes anything.

    A local folder must hold a ``*.safetensors`` file (one file or the shards of an index);
    a hub repository is asked for its file list, and the check is skipped when the hub
    cannot be asked (offline): loading then gives its own error."""
    if source.local:
        root = Path(source.location)
        if any(root.glob("*.safetensors")):
            return
        others = sorted(f.name for f in root.iterdir() if f.is_file() and f.suffix in _OTHER_WEIGHTS)
        found = f" (found {', '.join(others)})" if others else ""
        raise ModelError(f"{field}: {source.location!r} has no .safetensors weights{found}; weights load only "
                         f"from safetensors (convert with save_pretrained(..., safe_serialization=True))")
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(source.location, revision=source.revision)
        names = [s.rfilename for s in (info.siblings or [])]
    except Exception:  # noqa: BLE001 - offline, gated or unknown: loading reports it
        return
    if names and not any(n.endswith(".safetensors") for n in names):
        raise ModelError(f"{field}: {source.describe()!r} has no .safetensors weights on the hub; "
                         f"weights load only from safetensors")


# Model types whose causal-LM class is a decoder only when the config says ``is_decoder: true``
# (BERT and its relatives load as ``BertLMHeadModel`` with bidirectional attention otherwise):
# every type that transformers also maps to a masked-LM class.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "WithLMHead", "ForConditionalGeneration")


def causal_lm_problem(config) -> str | None:
    """Why a model config is not a causal language model (``None`` when it is one).

    The rule, in order: an encoder-decoder is refused (``is_encoder_decoder``); a model
    type that has a masked-LM class in transformers (BERT, RoBERTa, ELECTRA, ...) is a
    bidirectional encoder unless its config sets ``is_decoder: true``; declared
    ``architectures`` must include a language-model head (a class name ending in
    ``ForCausalLM``, ``LMHeadModel``, ``WithLMHead`` or ``ForConditionalGeneration``), so a
    ``BertModel`` or a ``...ForSequenceClassification`` checkpoint, whose LM head would be
    random, is refused; and the model type must have a causal-LM class (in transformers,
    or in the repository's ``auto_map`` with ``trust_remote_code``)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None) or "?"
    if getattr(config, "is_encoder_decoder", False):
        return f"an encoder-decoder model (model_type {kind!r})"
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            and not getattr(config, "is_decoder", False) and not getattr(config, "causal", False):
        return f"a bidirectional encoder (model_type {kind!r} without is_decoder: true)"
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return f"not a language model (architectures {', '.join(archs)} have no causal LM head)"
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        return f"not a causal language model (transformers has no causal-LM class for model_type {kind!r})"
    return None


def load_tokenizer(source: ModelSource, field: str = "id"):
    """The model's tokenizer. Documents are tokenized whole and cut into segments later, so
    transformers' "Token indices sequence length is longer than the specified maximum" warning
    is noise here and is switched off for this tokenizer."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, source, field)
    warned = getattr(tok, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (x86 ``avx512_bf16`` or AMX
    ``amx_bf16``, read from ``/proc/cpuinfo``); elsewhere torch emulates bf16 through fp32,
    slower than fp32 itself."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device, warn: Callable[[str], None] | None = None) -> str:
    """The dtype a model runs in on ``device``: ``auto`` is bfloat16 on CUDA (if supported) and
    float32 on CPU; ``bfloat16`` on a CPU without native bf16 (:func:`cpu_bf16`) runs in
    float32, with one line to ``warn`` (it would be slower than float32 there)."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_bf16():
        if warn is not None:
            warn("warning: dtype bfloat16: this CPU has no native bf16 (avx512_bf16 or AMX), where torch "
                 "emulates it more slowly than float32: running in float32")
        return "float32"
    return _DTYPES[dtype]


def load_model(source: ModelSource, *, dtype: str = "float32", device=None, field: str = "id"):
    """A causal LM in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint load is noise in a scan
    # transformers picks SDPA attention where the architecture supports it (not Gemma-2)
    model = _from_pretrained(AutoModelForCausalLM, source, field, dtype=getattr(torch, dtype),
                             use_safetensors=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The context length a model config declares (None if it declares none)."""
    cfg = text_config(config)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_layers(config) -> int:
    return int(text_config(config).num_hidden_layers)


@contextlib.contextmanager
def quiet_transformers():
    """No "Writing model shards" bars from ``save_pretrained`` and no warning about attention
    masks (training windows contain eos = pad but are never padded); restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- one tensor: the output embedding
@dataclass(frozen=True)
class OutputEmbedding:
    """The output projection rows (vocab x d) of a model, as stored (dtype kept).

    ``tied``: the model ties its output projection to the input embedding (then ``weight``
    is that embedding). ``tensor``: the name read from the safetensors files, or ``None``
    when the model had to be loaded. ``via``: ``"safetensors"`` or ``"model"``.
    """

    weight: Any  # torch.Tensor
    tied: bool
    tensor: str | None
    via: str


# names of the output projection / input embedding in common checkpoints (matched as suffixes)
_OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight", "ff_out.weight", "output.weight")
_INPUT_NAMES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight",
                "tok_embeddings.weight", "wte.embedding.weight")


def _fetch(source: ModelSource, filename: str) -> Path | None:
    """Local path of one file of the model (downloaded to the hub cache if needed), or None."""
    if source.local:
        p = Path(source.location) / filename
        return p if p.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source.location, filename, revision=source.revision))
    except Exception:  # missing entry, offline without cache, gated
        return None


def _raw_config(source: ModelSource) -> dict:
    p = _fetch(source, "config.json")
    if p is None:
        raise ModelError(f"id: {source.describe()!r} has no readable config.json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"id: config.json of {source.describe()!r} is not valid JSON: {err}") from None


def _config_tied(source: ModelSource) -> bool:
    """Whether the model ties lm_head to the input embedding (config class defaults apply)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(source.location, revision=source.revision,
                                         trust_remote_code=source.trust_remote_code)
        if hasattr(cfg, "weight_tying"):  # OLMo 1 (hf_olmo) configs
            return bool(cfg.weight_tying)
        value = getattr(cfg, "tie_word_embeddings", None)
        if value is None:
            value = getattr(text_config(cfg), "tie_word_embeddings", True)
        return bool(value)
    except (OSError, ValueError, KeyError):  # unknown architecture: the raw file
        raw = _raw_config(source)
        text = raw.get("text_config") or {}
        for key in ("weight_tying", "tie_word_embeddings"):
            for d in (raw, text):
                if key in d:
                    return bool(d[key])
        return True  # transformers' PretrainedConfig default


def _weight_map(source: ModelSource) -> dict[str, str] | None:
    """tensor name -> safetensors file name, from the index or the single file; None if neither."""
    index = _fetch(source, "model.safetensors.index.json")
    if index is not None:
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError):
            return None
    single = _fetch(source, "model.safetensors")
    if single is None:
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def _pick(names: Iterable[str], suffixes: Sequence[str]) -> str | None:
    names = list(names)
    for suffix in suffixes:
        hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if hits:
            return min(hits, key=lambda n: (n.count("."), n))
    return None


def read_output_embeddings(source: ModelSource, *, allow_load: bool = True) -> OutputEmbedding:
    """The output embedding matrix of a model, reading one tensor from its safetensors files.

    The tensor is ``lm_head.weight`` (or ``embed_out`` / ``ff_out`` / ``output``), or the input
    embedding (``embed_tokens`` / ``wte`` / ...) when the config ties them. Works on a single
    ``model.safetensors`` or a sharded index (only the shard holding the tensor is opened or,
    for a hub id, downloaded), so a 7B model is never loaded whole. Falls back to loading the
    model (float32) and taking ``get_output_embeddings().weight`` when the files do not
    name the tensor (``allow_load=False``: a :class:`ModelError` instead).
    """
    tied = _config_tied(source)
    wmap = _weight_map(source)
    name = None
    if wmap is not None:
        name = _pick(wmap, _INPUT_NAMES if tied else _OUTPUT_NAMES)
    if name is not None and wmap is not None:  # name is only set from wmap
        path = _fetch(source, wmap[name])
        if path is not None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                weight = f.get_tensor(name)
            if weight.ndim == 2:
                return OutputEmbedding(weight, tied, name, "safetensors")
    if not allow_load:
        raise ModelError(f"id: no output embedding tensor found in the safetensors files of {source.describe()!r}")
    model = load_model(source, dtype="float32")
    out = model.get_output_embeddings()
    if out is None:
        raise ModelError(f"id: {source.describe()!r} has no output embedding (not a causal LM head)")
    inp = model.get_input_embeddings()
    really_tied = inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    return OutputEmbedding(out.weight.detach(), really_tied, None, "model")
