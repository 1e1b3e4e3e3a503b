"""Text sources: the embedded corpus (built from what every CPython install ships) and
hub datasets read with ``datasets``.

The embedded corpus has two domains:

* ``prose``: the reference documentation in ``pydoc_data.topics`` (one document per
  topic) and the docstrings of the standard library (one document per module: module,
  class and function docstrings joined by blank lines);
* ``code``: the standard-library Python sources (one document per file).

Test suites, GUI and vendored packages are left out. Documents are split into
``train`` / ``validation`` / ``test`` by a hash of their id (held-out shares
``VALIDATION_SHARE`` and ``TEST_SHARE``), so the zoo models are trained on ``train``, scanned
on held-out ``validation`` text, and ``test`` is kept for the held-out check (paper 001 A.4).
Everything is deterministic for a given Python version.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from dispersion.core.errors import DataError

VALIDATION_SHARE = 0.25
TEST_SHARE = 0.10
SPLITS = ("train", "validation", "test")
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages",
              "dist-packages", "__pycache__", "ensurepip", "venv"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def split_of(doc_id: str, validation_share: float = VALIDATION_SHARE, test_share: float = TEST_SHARE) -> str:
    """``train``, ``validation`` or ``test``, from a stable hash of the document id."""
    u = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") / 2**64
    return "validation" if u < validation_share else "test" if u < validation_share + test_share else "train"


def _stdlib_sources() -> list[tuple[str, str]]:
    lib = sysconfig.get_paths()["stdlib"]
    out = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, lib).replace(os.sep, "/")
                with open(path, encoding="utf-8", errors="replace") as fh:
                    out.append((rel, fh.read()))
    return out


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                docs.append(doc.strip())
    return docs


@lru_cache(maxsize=2)
def _embedded(domain: str) -> tuple[Document, ...]:
    if domain == "code":
        return tuple(Document(f"code/{rel}", text) for rel, text in _stdlib_sources() if text.strip())
    if domain == "prose":
        from pydoc_data.topics import topics

        docs = [Document(f"topics/{k}", topics[k]) for k in sorted(topics)]
        for rel, text in _stdlib_sources():
            parts = _docstrings(text)
            if parts:
                docs.append(Document(f"docstrings/{rel}", "\n\n".join(parts)))
        return tuple(docs)
    raise DataError(f"embedded: unknown domain {domain!r} (expected 'prose' or 'code')")


def embedded_documents(domain: str, split: str = "all") -> list[Document]:
    """Documents of one embedded domain and split (``train``, ``validation``, ``test`` or ``all``)."""
    docs = _embedded(domain)
    if split == "all":
        return list(docs)
    if split not in SPLITS:
        raise DataError(f"split: unknown split {split!r} for the embedded corpus")
    return [d for d in docs if split_of(d.doc_id) == split]


def hf_documents(path: str, name: str | None = None, split: str = "train", text_field: str = "text",
                 streaming: bool = False, max_documents: int | None = None, group_rows: int = 1,
                 trust_remote_code: bool = False) -> Iterator[Document]:
    """Documents of a ``datasets`` dataset (hub id or local folder), in dataset order.

    ``doc_id`` is ``{split}/{first row index}``. Empty rows are skipped. ``group_rows`` joins
    that many consecutive rows (with newlines) into one document, for datasets stored one
    line per row such as WikiText, whose rows are mostly shorter than a segment.
    """
    import datasets

    try:
        kwargs = {"trust_remote_code": True} if trust_remote_code else {}
        ds = datasets.load_dataset(path, name, split=split, streaming=streaming, **kwargs)
    except FileNotFoundError as err:
        raise DataError(f"hf.path: dataset {path!r} not found ({_first_line(err)})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"hf: cannot read {path!r} split={split!r}: {_read_problem(err)}") from None
    except (ValueError, OSError, ConnectionError) as err:  # offline, unknown config/split, network
        raise DataError(f"hf: cannot load {path!r} name={name!r} split={split!r}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - datasets' builders fail in many ways on bad files
        raise DataError(f"hf: cannot read {path!r} split={split!r}: {_read_problem(err)}") from None
    try:
        yield from _rows(ds, path, split, text_field, max_documents, group_rows)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a bad row deep in a file (non-UTF-8 text, ...)
        raise DataError(f"hf: cannot read {path!r} split={split!r}: {_read_problem(err)}") from None


def _read_problem(err: BaseException) -> str:
    """One line on why ``datasets`` could not read a dataset (the cause it wrapped, if any)."""
    while err.__cause__ is not None and type(err).__name__ in ("DatasetGenerationError", "RuntimeError"):
        err = err.__cause__
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the data files as UTF-8"
    if isinstance(err, StopIteration):
        return "no rows (is a data file empty?)"
    return f"{type(err).__name__}: {_first_line(err)}"


def _rows(ds, path: str, split: str, text_field: str, max_documents: int | None,
          group_rows: int) -> Iterator[Document]:
    columns = getattr(ds, "column_names", None) or list(getattr(ds, "features", {}) or {})
    if columns and text_field not in columns:
        raise DataError(f"hf.text_field: {text_field!r} is not a column of {path!r} (columns: {columns})")
    n = 0
    buf: list[str] = []
    first = 0
    for i, row in enumerate(ds):
        if max_documents is not None and n >= max_documents:
            return
        if text_field not in row:
            raise DataError(f"hf.text_field: {text_field!r} is not a field of {path!r}")
        if not buf:
            first = i
        text = row[text_field]
        buf.append(text if isinstance(text, str) else "")
        if len(buf) == group_rows:
            joined = "\n".join(buf)
            buf = []
            if joined.strip():
                n += 1
                yield Document(f"{split}/{first}", joined)
    joined = "\n".join(buf)
    if joined.strip() and (max_documents is None or n < max_documents):
        yield Document(f"{split}/{first}", joined)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def document_source(spec) -> Callable[[], Iterator[Document]]:  # spec: dispersion.core.config.DatasetSpec
    """A function that opens the documents of a configured dataset (again on each call).

    The source is opened once here, so a missing dataset or text field fails now."""
    if spec.embedded is not None:
        docs = embedded_documents(spec.embedded, spec.split)
        return lambda: iter(docs)
    if spec.synthetic is not None:
        from dispersion.measure.synthetic import synthetic_texts

        def keep(doc_id: str) -> bool:
            return spec.split == "all" or split_of(doc_id) == spec.split

        return lambda: (Document(i, text) for i, text in synthetic_texts(spec.synthetic, keep))
    h = spec.hf

    def open_docs() -> Iterator[Document]:
        return hf_documents(h.path, h.name, h.split, h.text_field, h.streaming, h.max_documents,
                            h.group_rows, h.trust_remote_code)
    next(open_docs(), None)
    return open_docs


def documents(spec) -> list[Document]:
    """All documents of a configured dataset, in memory."""
    return list(document_source(spec)())


def dataset_key(spec) -> str:
    """A stable string identifying a dataset's documents (for sample keys)."""
    if spec.embedded is not None:
        import sys

        return f"embedded:{spec.embedded}:{spec.split}:py{sys.version_info[0]}.{sys.version_info[1]}"
    if spec.synthetic is not None:
        g = spec.synthetic
        return f"synthetic:{g.kind}:{g.documents}:{g.words}:{g.vocabulary}:{g.exponent}:{g.seed}:{spec.split}"
    h = spec.hf
    return f"hf:{h.path}:{h.name}:{h.split}:{h.text_field}:{h.max_documents}:{h.group_rows}"
