"""Checkpoint branches of a hub repo (OLMo-style) and picking a step range out of them.

Paper 001 B.2.2 follows Olmo-7B "every 20,000 steps from step 120,000 to step 700,000"
(N = 30 checkpoints). OLMo repos publish each intermediate checkpoint as a git branch:

* ``step1000-tokens4B`` (OLMo-7B / OLMo-1B, OLMoE), ``step1000-tokens4096M``;
* ``stage1-step140000-tokens588B``, ``stage2-ingredient1-step11931-tokens50B`` (OLMo 2:
  a stage prefix; step numbers restart in each stage and ingredient);
* ``step143000`` (Pythia style, no token count), plus ``main`` and other names that are
  not checkpoints (ignored).

Real listings are irregular: steps are missing, and one step can appear under several
prefixes or token counts. :func:`resolve_revisions` picks one branch per target step with a
deterministic rule and reports the targets it could not fill.

:class:`RevisionRange` is the config block (``models.N.revisions`` once wired into
``ModelSpec``); :func:`expand_revisions` turns it into branch names for a model id.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dispersion.core.config import RevisionRange
from dispersion.core.errors import ConfigError, DataError, ModelError

__all__ = [
    "Branch",
    "RevisionRange",
    "expand_revisions",
    "list_hub_branches",
    "parse_branch",
    "parse_branches",
    "read_branches_file",
    "resolve_revisions",
    "target_steps",
]

log = logging.getLogger(__name__)

_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_BRANCH_RE = re.compile(
    r"^(?:(?P<stage>[A-Za-z0-9][A-Za-z0-9_.\-]*?)-)?"
    r"step(?P<step>\d+)"
    r"(?:-tokens(?P<num>\d+(?:\.\d+)?)(?P<unit>[KMBT]))?$"
)


@dataclass(frozen=True, order=True)
class Branch:
    """One checkpoint branch: ``stage`` is the prefix before ``step`` (``None`` when absent),
    ``tokens`` the token count it names (``4B`` -> 4_000_000_000; ``None`` when absent)."""

    name: str
    stage: str | None
    step: int
    tokens: int | None


def parse_branch(name: str) -> Branch | None:
    """``Branch`` of an OLMo-style checkpoint name, or ``None`` for other names (``main``)."""
    m = _BRANCH_RE.match(name.strip())
    if m is None:
        return None
    tokens = None
    if m.group("num") is not None:
        tokens = int(round(float(m.group("num")) * _UNITS[m.group("unit")]))
    return Branch(name=name.strip(), stage=m.group("stage"), step=int(m.group("step")), tokens=tokens)


def parse_branches(names: Iterable[str]) -> list[Branch]:
    """The checkpoint branches among ``names`` (others dropped), de-duplicated, in input order."""
    seen: set[str] = set()
    out: list[Branch] = []
    for name in names:
        b = parse_branch(name)
        if b is not None and b.name not in seen:
            seen.add(b.name)
            out.append(b)
    return out


def read_branches_file(path: str | os.PathLike) -> list[str]:
    """Branch names from a recorded list: one per line; blank lines and ``#`` comments ignored."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"revisions.branches_file: no such file {str(p)!r}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"revisions.branches_file: cannot read {str(p)!r}: {type(err).__name__}") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def list_hub_branches(repo_id: str) -> list[str]:
    """Every branch name of a hub model repo (``HfApi().list_repo_refs(repo_id).branches``), sorted.

    Offline (``HF_HUB_OFFLINE=1``) or on any hub failure: one-line :class:`ModelError`.
    """
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise ModelError(f"revisions: cannot list the branches of {repo_id!r}: HF_HUB_OFFLINE is set "
                         "(give revisions.branches_file)")
    try:
        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(repo_id)
    except Exception as err:  # offline, unknown repo, gated, network
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ModelError(f"revisions: cannot list the branches of {repo_id!r}: {first}") from None
    return sorted(b.name for b in refs.branches)


def target_steps(start: int, stop: int, every: int) -> list[int]:
    """``start, start + every, ...`` up to and including ``stop``; errors name ``revisions.*``."""
    for field, value in (("start", start), ("stop", stop), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"revisions.{field}: must be an integer, got {value!r}")
    if start < 0:
        raise ConfigError(f"revisions.start: must be >= 0, got {start}")
    if every <= 0:
        raise ConfigError(f"revisions.every: must be > 0, got {every}")
    if stop < start:
        raise ConfigError(f"revisions.stop: must be >= revisions.start ({start}), got {stop}")
    return list(range(start, stop + 1, every))


def _stage_key(stage: str | None) -> tuple:
    """Unprefixed first, then natural order (``stage1`` < ``stage2-ingredient1`` < ``...10``)."""
    if stage is None:
        return (0, ())
    return (1, tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", stage) if t))


def resolve_revisions(branches: Iterable[str | Branch], start: int, stop: int, every: int, *,
                      stage: str | None = None, tolerance: int = 0) -> tuple[list[str], list[int]]:
    """One branch per target step ``start, start + every, ..., stop`` (``stop`` included when
    it is on the grid).

    Candidates are the checkpoint branches (non-checkpoint names are ignored) of ``stage``
    (exact prefix match, ``None``: every stage) whose step is within ``tolerance`` of the
    target. Tie rule, in order: smallest ``|step - target|``; the earlier step; the earlier
    stage (unprefixed, then natural order); the smaller token count; the name. A branch
    is used for one target at most (a later target takes its next candidate), so the
    result never repeats a checkpoint.

    Returns:
        ``(chosen, missing)``: chosen branch names in target order, and the target steps
        with no candidate.

    Raises:
        ConfigError: naming ``revisions.start`` / ``stop`` / ``every`` / ``tolerance`` /
            ``stage`` (a stage that no branch has).
    """
    targets = target_steps(start, stop, every)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ConfigError(f"revisions.tolerance: must be an integer >= 0, got {tolerance!r}")
    maybe = [b if isinstance(b, Branch) else parse_branch(b) for b in branches]
    parsed = [b for b in maybe if b is not None]
    if stage is not None:
        stages = sorted({b.stage for b in parsed if b.stage is not None}, key=_stage_key)
        parsed = [b for b in parsed if b.stage == stage]
        if not parsed:
            raise ConfigError(f"revisions.stage: no branch has stage {stage!r} "
                              f"(stages: {', '.join(stages) or 'none'})")
    by_step: dict[int, list[Branch]] = {}
    for b in parsed:
        by_step.setdefault(b.step, []).append(b)
    steps = sorted(by_step)

    used: set[str] = set()
    chosen: list[str] = []
    missing: list[int] = []
    for t in targets:
        lo = bisect.bisect_left(steps, t - tolerance)
        hi = bisect.bisect_right(steps, t + tolerance)
        cands = [b for s in steps[lo:hi] for b in by_step[s] if b.name not in used]
        if not cands:
            missing.append(t)
            continue
        best = min(cands, key=lambda b: (abs(b.step - t), b.step, _stage_key(b.stage),
                                         b.tokens if b.tokens is not None else -1, b.name))
        used.add(best.name)
        chosen.append(best.name)
    return chosen, missing


def _available_branches(model_id: str, spec: RevisionRange, base_dir: str | os.PathLike | None) -> list[str]:
    if spec.branches_file is not None:
        path = Path(os.path.expanduser(spec.branches_file))
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return read_branches_file(path)
    local = Path(os.path.expanduser(model_id))
    if local.is_dir():  # a local checkpoint root: its stepN sub-folders are the branches
        return sorted(p.name for p in local.iterdir() if p.is_dir() and (p / "config.json").is_file())
    return list_hub_branches(model_id)


def expand_revisions(model_id: str, spec: RevisionRange, *,
                     base_dir: str | os.PathLike | None = None) -> list[str]:
    """The branch names a :class:`RevisionRange` selects for ``model_id``, in step order.

    Branches come from ``spec.branches_file`` (relative paths resolved against
    ``base_dir`` when given, else the working directory), else from the local folder's
    sub-folders, else from the hub. Missing targets are logged as a warning; a range that
    selects nothing is a :class:`ConfigError`.
    """
    names = _available_branches(model_id, spec, base_dir)
    chosen, missing = resolve_revisions(names, spec.start, spec.stop, spec.every,
                                        stage=spec.stage, tolerance=spec.tolerance)
    if not chosen:
        raise ConfigError(f"revisions: no branch of {model_id!r} matches steps {spec.start}..{spec.stop} "
                          f"every {spec.every} (tolerance {spec.tolerance})")
    if missing:
        log.warning("revisions: %s has no branch for %d of %d target steps: %s", model_id, len(missing),
                    len(missing) + len(chosen), ", ".join(map(str, missing)))
    return chosen
