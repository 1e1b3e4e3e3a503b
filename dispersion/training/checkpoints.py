"""Training checkpoints: one folder per step, written atomically, and their copy in a store.

A checkpoint ``step{N}/`` holds the loadable model (``config.json``, ``model.safetensors``,
tokenizer files; ``modeling.load_model`` and ``from_pretrained`` read it), the optimizer state
(``optimizer.pt``), the trainable weights when some are frozen or a custom export is used
(``trainable.safetensors``) and ``trainer_state.json`` (step, run key), written last: a folder
is a complete checkpoint exactly when it has a trainer state. Locally the folder is built in a
hidden temporary sibling and renamed into place.

:class:`Mirror` keeps a copy of a run's folder in an fsspec store (a local folder, or S3 in
production): every checkpoint is uploaded file by file with the trainer state last, so a
stored checkpoint counts only once complete, and ``metrics.jsonl`` after every evaluation
and checkpoint. A run that starts where its local folder is missing or behind (a Ray task
retried on another node, a pre-empted machine) pulls the newest stored checkpoint and
resumes from it (``dispersion.training.train.train``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dispersion.core.errors import ConfigError, ModelError
from dispersion.core.ids import step_folder
from dispersion.core.storage import Store

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINABLE_FILE = "trainable.safetensors"
METRICS_FILE = "metrics.jsonl"
TRAIN_FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def checkpoint_steps(out_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``out_dir`` (those with a trainer state), sorted."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    steps = []
    for p in out.iterdir():
        n = step_folder(p.name)
        if n is not None and p.is_dir() and (p / STATE_FILE).is_file():
            steps.append(n)
    return sorted(steps)


def _all_trainable(model) -> bool:
    return all(p.requires_grad for p in model.parameters())


def copy_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        for f in src.iterdir():
            if f.is_file() and (f.name in TOKENIZER_FILES or f.name.startswith("tokenizer")):
                shutil.copy2(f, folder / f.name)
    else:
        tokenizer.save_pretrained(folder)


def save_checkpoint(model, optimizer, folder: Path, *, step: int, key: str, tokenizer=None,
                    export: Callable | None = None) -> Path:
    """Write ``folder`` atomically: the model (``export(model, tmp)`` or ``save_pretrained``),
    the tokenizer, the optimizer state, the trainable weights when needed, the trainer state."""
    import torch
    from safetensors.torch import save_file

    from dispersion.core.folders import publishing
    from dispersion.measure.modeling import quiet_transformers

    with publishing(folder) as tmp:  # a stale folder of the same step (e.g. without trainer state) is replaced
        with quiet_transformers():  # no "Writing model shards" bar per checkpoint
            if export is None:
                model.save_pretrained(tmp)
            else:
                export(model, tmp)
        copy_tokenizer(tokenizer, tmp)
        trainable = None
        if export is not None or not _all_trainable(model):
            trainable = TRAINABLE_FILE
            save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                      str(tmp / TRAINABLE_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        # safetensors are written 0600; give every file the umask-honouring mode of config.json
        ref = tmp / "config.json"
        if ref.exists():
            mode = ref.stat().st_mode & 0o777
            for f in tmp.iterdir():
                if f.is_file():
                    os.chmod(f, mode)
        state = {"format": TRAIN_FORMAT, "step": step, "key": key, "trainable": trainable}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return folder


def load_checkpoint(model, optimizer, folder: Path, device) -> dict:
    """Load a checkpoint's weights and optimizer state into ``model`` / ``optimizer``."""
    import torch

    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("trainable"):
        from safetensors.torch import load_file

        saved = load_file(str(folder / state["trainable"]))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing or any(n not in params for n in saved):
            raise ModelError(f"train: checkpoint {folder} does not match the model's trainable parameters")
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
    else:
        dtype = next(model.parameters()).dtype
        loaded = type(model).from_pretrained(folder, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        del loaded
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True))
    return state


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``out_dir/metrics.jsonl`` (``[]`` when there is none)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> list[dict]:
    rows = [r for r in read_metrics(path.parent) if r["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


@dataclass
class Mirror:
    """A run folder's copy at ``store/prefix`` (``prefix/step{N}/...``, ``prefix/metrics.jsonl``)."""

    store: Store
    prefix: str

    def rel(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}"

    def url(self, step: int | None = None) -> str:
        return self.store.url(self.rel(f"step{step}") if step is not None else self.prefix.rstrip("/"))

    def steps(self) -> list[int]:
        """Steps of the complete stored checkpoints (those whose trainer state is stored), sorted."""
        found = (step_folder(p.rsplit("/", 2)[-2]) for p in self.store.glob(self.rel(f"step*/{STATE_FILE}")))
        return sorted(n for n in found if n is not None)

    def push_checkpoint(self, folder: Path) -> str:
        """Upload a complete local checkpoint (trainer state last); returns its URL."""
        step = step_folder(folder.name)
        if step is None or not (folder / STATE_FILE).is_file():
            raise ModelError(f"checkpoint: {folder} is not a complete checkpoint folder")
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        for f in sorted(files, key=lambda f: f.name == STATE_FILE):
            self.store.upload(str(f), self.rel(f"{folder.name}/{f.name}"))
        return self.url(step)

    def push_metrics(self, path: Path) -> None:
        if path.is_file():
            self.store.upload(str(path), self.rel(METRICS_FILE))

    def stored_key(self, step: int) -> str | None:
        """The run key in a stored checkpoint's trainer state."""
        state = self.store.read_json(self.rel(f"step{step}/{STATE_FILE}"))
        return None if state is None else state.get("key")

    def pull(self, step: int, out_dir: Path) -> Path:
        """Download stored checkpoint ``step`` into ``out_dir/step{N}`` and the metrics log beside
        it; both land together (renamed into place only once every file is here)."""
        from dispersion.core.folders import publishing

        final = out_dir / f"step{step}"
        with publishing(final) as tmp:
            metrics_tmp = tmp / f".{METRICS_FILE}"
            for rel in self.store.glob(self.rel(f"step{step}/*")):
                name = rel.rsplit("/", 1)[-1]
                if name.startswith("."):
                    continue  # another writer's upload in progress
                self.store.download(rel, str(tmp / name))
            if not (tmp / STATE_FILE).is_file():
                raise ModelError(f"checkpoint: {self.url(step)} has no {STATE_FILE}")
            has_metrics = self.store.exists(self.rel(METRICS_FILE))
            if has_metrics:
                self.store.download(self.rel(METRICS_FILE), str(metrics_tmp))
                os.replace(metrics_tmp, out_dir / METRICS_FILE)
        return final

    def sync_down(self, out_dir: Path, key: str | None = None) -> int | None:
        """Pull the newest stored checkpoint when it is newer than every local one; its step or
        ``None``. With ``key``, a stored checkpoint of another run is refused before any download."""
        stored = self.steps()
        local = checkpoint_steps(out_dir)
        if stored and (not local or stored[-1] > local[-1]):
            if key is not None and self.stored_key(stored[-1]) != key:
                raise ConfigError(f"train: {self.url(stored[-1])} holds a checkpoint of a different run "
                                  f"(spec, model or precision changed); use another prefix or remove it")
            self.pull(stored[-1], out_dir)
            return stored[-1]
        return None

    def push_missing(self, out_dir: Path) -> None:
        """Upload every local checkpoint the store lacks (oldest first), then the metrics log."""
        have = set(self.steps())
        for step in checkpoint_steps(out_dir):
            if step not in have:
                self.push_checkpoint(out_dir / f"step{step}")
        self.push_metrics(out_dir / METRICS_FILE)
