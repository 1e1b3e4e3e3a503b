"""Command-line changes to a run config, applied to its raw mapping before validation.

Three forms, as lm-evaluation-harness users type them::

    --model EleutherAI/pythia-70m@step1000        a hub id (or local folder) at a revision
    --model pythia=EleutherAI/pythia-70m@step1000,step2000   named, several revisions
    --model zoo:gpt2-tiny@all   --model packaged:smollm2-135m   --model gguf:/path/model.gguf
    --dataset embedded:prose    --dataset embedded:code:test
    --dataset hf:wikitext:wikitext-103-raw-v1:validation:text
    --dataset synthetic:zipf    (a generated load-test corpus, not text)
    -o sampling.num_segments=200 -o models.0.dtype=bfloat16 -o extraction.layers=[1,final]

``--model`` / ``--dataset`` replace the config's whole ``models`` / ``datasets`` list (you
scan what you name); ``-o key.path=value`` then sets one field, the value read as YAML
(``true``, ``12``, ``[1, final]``, ``{path: x}``), a number in the path indexing a list.
Validation of the result is the config's own, so errors name the field as usual.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from dispersion.core.errors import ConfigError
from dispersion.core.ids import step_of

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


def _name_of(text: str) -> str:
    """A config name (``[A-Za-z0-9_.-]+``) from the last path part of ``text``."""
    base = text.rstrip("/").rsplit("/", 1)[-1] or text
    return _NAME_BAD.sub("-", base).strip("-") or "model"


def _split_name(spec: str, flag: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); a bare SPEC -> (None, SPEC)."""
    m = re.match(r"^([A-Za-z0-9_.\-]+)=(.*)$", spec)
    if m is None:
        return None, spec
    if not m.group(2):
        raise ConfigError(f"{flag} {spec}: nothing after '{m.group(1)}='")
    return m.group(1), m.group(2)


def split_revision(ref: str) -> tuple[str, list[str] | None]:
    """``org/name@rev1,rev2`` -> (``org/name``, [rev1, rev2]); no ``@`` -> (ref, None)."""
    if "@" not in ref:
        return ref, None
    base, _, revs = ref.rpartition("@")
    revisions = [r.strip() for r in revs.split(",") if r.strip()]
    if not base or not revisions:
        raise ValueError(f"{ref!r}: expected MODEL@REVISION (e.g. EleutherAI/pythia-70m@step1000)")
    return base, revisions


def model_entry(spec: str) -> dict[str, Any]:
    """One ``--model`` value as a ``models`` entry of the config."""
    name, body = _split_name(spec.strip(), "--model")
    kind, sep, rest = body.partition(":")
    if sep and kind in ("zoo", "packaged", "gguf"):
        ref, revisions = split_revision(rest) if kind == "zoo" else (rest, None)
        if not ref:
            raise ConfigError(f"--model {spec}: nothing after '{kind}:'")
        entry: dict[str, Any] = {"name": name or _name_of(ref), kind: ref}
        if revisions is not None:
            entry["revisions"] = "all" if revisions == ["all"] else revisions
        return entry
    if looks_like_path(body) and os.path.isdir(os.path.expanduser(body)):
        ref, revisions = body, None  # a folder whose name holds an '@'
    else:
        try:
            ref, revisions = split_revision(body)
        except ValueError as err:
            raise ConfigError(f"--model {err}") from None
    if not ref:
        raise ConfigError("--model: empty model id")
    if looks_like_path(ref):
        return _folder_entry(spec, name, ref, revisions)
    entry = {"name": name or _name_of(ref), "id": ref}
    if revisions is not None:
        entry["revisions"] = revisions
    return entry


def looks_like_path(ref: str) -> bool:
    """Whether a model reference is a local folder rather than a hub id (``org/name``): it
    starts with ``/``, ``.`` or ``~``, has more than one ``/``, or names an existing folder (or
    its first part does). A hub id has at most one ``/`` and starts with neither."""
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref:
        return True
    return os.path.isdir(os.path.expanduser(ref)) or ("/" in ref and os.path.isdir(ref.split("/", 1)[0]))


def folder_model_name(folder: Path) -> str:
    """A readable name for a local model folder: the GGUF file it was converted from
    (``gguf.json``), else the hub id it was saved from (``_name_or_path`` of ``config.json``),
    else the folder's own name."""
    for meta, key in (("gguf.json", "gguf"), ("config.json", "_name_or_path")):
        try:
            value = json.loads((folder / meta).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value and not looks_like_path(value):
            return _name_of(value.removesuffix(".gguf"))
    return _name_of(str(folder.resolve()))


def _folder_entry(spec: str, name: str | None, ref: str, revisions: list[str] | None) -> dict[str, Any]:
    """A local folder as a ``models`` entry. A checkpoint folder (``.../gpt2-tiny/step300``:
    a name with a training step, under a folder) is its parent at that revision, so that
    ``step`` and the model name are those of the checkpoint series."""
    folder = Path(os.path.expanduser(ref))
    if not folder.is_dir():
        raise ConfigError(f"--model {spec}: no such model folder {ref!r}")
    parent = folder.resolve().parent
    if revisions is None and step_of(folder.name) is not None and parent != folder.resolve():
        return {"name": name or folder_model_name(parent), "id": str(parent), "revisions": [folder.name]}
    entry: dict[str, Any] = {"name": name or folder_model_name(folder), "id": ref}
    if revisions is not None:
        entry["revisions"] = revisions
    return entry


def dataset_entry(spec: str) -> dict[str, Any]:
    """One ``--dataset`` value (``embedded:DOMAIN[:SPLIT]``, ``hf:PATH[:NAME[:SPLIT[:FIELD]]]``
    or ``synthetic:zipf[:SPLIT]``, the load-test corpus) as a ``datasets`` entry of the config."""
    name, body = _split_name(spec.strip(), "--dataset")
    kind, _, rest = body.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "embedded" and 1 <= len(parts) <= 2:
        entry: dict[str, Any] = {"name": name or parts[0], "embedded": parts[0]}
        if len(parts) == 2:
            entry["split"] = parts[1]
        return entry
    if kind == "synthetic" and 1 <= len(parts) <= 2 and parts[0] == "zipf":
        entry = {"name": name or "zipf", "synthetic": {"kind": "zipf"}}
        if len(parts) == 2:
            entry["split"] = parts[1]
        return entry
    if kind == "hf" and 1 <= len(parts) <= 4 and parts[0]:
        keys = ("path", "name", "split", "text_field")
        hf = {k: v for k, v in zip(keys, parts, strict=False) if v}
        default = _name_of(parts[1]) if len(parts) > 1 and parts[1] else _name_of(parts[0])
        return {"name": name or default, "hf": hf}
    raise ConfigError(f"--dataset {spec}: expected embedded:DOMAIN[:SPLIT], hf:PATH[:NAME[:SPLIT[:FIELD]]] or "
                      f"synthetic:zipf[:SPLIT]")


def set_path(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` (value read as YAML) to ``data`` in place."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"-o {assignment}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"-o {key}: value is not valid YAML ({getattr(err, 'problem', err)})") from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"-o {key}: {where}: no list item {part} (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"-o {key}: {'.'.join(parts[:i])} is a value, not a mapping or list")


def apply_overrides(data: dict[str, Any], *, models: Sequence[str] = (), datasets: Sequence[str] = (),
                    overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of the raw config ``data`` with the command line's models, datasets and
    ``-o`` assignments applied, in that order."""
    out = copy.deepcopy(data)
    if models:
        out["models"] = [model_entry(m) for m in models]
    if datasets:
        out["datasets"] = [dataset_entry(d) for d in datasets]
    for assignment in overrides:
        set_path(out, assignment)
    return out


class CheckpointSweep(NamedTuple):
    """One model of a config at many checkpoints: ``revisions`` or the folders of ``checkpoint_glob``."""

    model: str
    revisions: Sequence[str] | None = None
    checkpoint_glob: str | None = None


def narrow_to_checkpoints(data: dict[str, Any], sweep: CheckpointSweep) -> dict[str, Any]:
    """A copy of the raw config ``data`` reduced to its model ``model`` at ``revisions`` (hub
    ``stepN`` branches, sub-folders of a local model) or at the folders ``checkpoint_glob``
    matches (each folder one revision, ordered by step): the models of the ``checkpoint-sweep``
    flow. Exactly one of the two is given."""
    import glob

    model, revisions, checkpoint_glob = sweep
    entries = [m for m in data.get("models") or [] if isinstance(m, dict)]
    found = [m for m in entries if m.get("name") == model]
    if not found:
        raise ConfigError(f"model: {model!r} is not in the config (models: {[m.get('name') for m in entries]})")
    if (revisions is None) == (checkpoint_glob is None):
        raise ConfigError("give exactly one of revisions or checkpoint_glob")
    spec = dict(found[0])
    if checkpoint_glob is not None:
        folders = sorted(p for p in glob.glob(os.path.expanduser(checkpoint_glob)) if os.path.isdir(p))
        if not folders:
            raise ConfigError(f"checkpoint_glob: {checkpoint_glob!r} matches no folder")
        parents = {os.path.dirname(os.path.abspath(p)) for p in folders}
        if len(parents) != 1:
            raise ConfigError(f"checkpoint_glob: folders must share one parent, got {sorted(parents)}")
        names = sorted((os.path.basename(p) for p in folders), key=lambda n: (step_of(n) is None, step_of(n) or 0, n))
        for source in ("zoo", "gguf", "packaged"):
            spec.pop(source, None)
        spec.update(id=parents.pop(), revisions=names)
    else:
        if not revisions:
            raise ConfigError("revisions: must not be empty")
        kind = next((k for k in ("gguf", "packaged") if spec.get(k) is not None), None)
        if kind is not None:
            raise ConfigError(f"revisions: {model!r} is a {kind} model, whose one revision is 'main'")
        spec["revisions"] = list(revisions)
    return {**data, "models": [spec]}
