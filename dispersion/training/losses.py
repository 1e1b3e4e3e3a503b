r"""Auxiliary dispersion losses for training (paper 001 §3.4 / B.4, papers 002 and 003).

Pure, differentiable torch functions over a batch of states ``H [B, T, d]`` (float32 or
float64; other dtypes are cast to float32), an optional padding ``mask [B, T]`` (True / 1 =
a real token; ``None`` = every position) and, for the cross-domain loss, ``domain [B]`` (the
domain id of each row). Every loss is a scalar to *minimise*; :func:`make_aux_loss` turns a
:class:`LossSpec` into the ``aux_loss(outputs, batch)`` callable of :func:`dispersion.training.train.train`.

Paper 001 §3.4 (push-away) and B.4.2 (squeeze), with unit vectors :math:`u_i = h_i/\|h_i\|`
and :math:`d = \frac{1}{N(N-1)}\sum_{i \ne j}(1 - u_i \cdot u_j)`, the average pairwise
cosine distance (paper 001 Eq. 1), computed in O(N d) through :math:`s = \sum_i u_i`:
:math:`\sum_{i \ne j} u_i \cdot u_j = \|s\|^2 - \sum_i \|u_i\|^2` (no N x N matrix):

* ``push_away``     :math:`\mathcal{L} = -d`;
* ``cross_domain``  :math:`\mathcal{L} = -d_\times`, the mean over the pairs of states from
  *different* domains, :math:`\sum_{dom(i) \ne dom(j)} u_i\cdot u_j = \|s\|^2 - \sum_k \|s_k\|^2`
  (per-domain sums :math:`s_k`) over :math:`N^2 - \sum_k n_k^2` ordered pairs; with two
  domains A, B this is exactly 001's :math:`\frac{1}{|A||B|}\sum_{i\in A, j \in B}(1 - u_i\cdot u_j)`;
* ``squeeze``       :math:`\mathcal{L} = +d` (the B.4.2 ablation).

Papers 002 (Table 1, the later version) / 003 (Table 1), per group of states
:math:`Z = [z_1..z_n]` and angular distance :math:`D_{ij} = \arccos(\cos(z_i, z_j))/\pi \in [0, 1]`:

* ``dispersion`` ("angular spread", 002's main loss):
  :math:`\log \sum_{i \ne j} \exp(-D_{ij}/\tau)`;
* ``l2_repel``:  :math:`\log \sum_{i \ne j} \exp(-\|z_i - z_j\|^2/\tau) + \lambda_{norm}\,\overline{z^2}`;
* ``orthogonal``: :math:`\frac{1}{n(n-1)}\sum_{i \ne j} \max(0, \tfrac12 - D_{ij})^2` (margin 1/2 =
  orthogonality in angular distance);
* ``decorrelation``: :math:`\sum_{m \ne n} \mathrm{Cov}_{mn}^2` over the correlation matrix of the
  feature dimensions (see :func:`decorrelation` for the authors' code, which correlates tokens).

Where the papers and the authors' code (github.com/KrishnaswamyLab/LM-Dispersion,
``transformer_dispersion/dispersion.py``) differ, ``LossSpec.form`` picks one
(``paper``, the default, or ``code``):

* dispersion, l2_repel: :math:`\log\sum_{i \ne j}` (paper) or :math:`\log\,\mathrm{mean}_{i \ne j}`
  (code): they differ by the constant :math:`\log n(n-1)`, the gradient is the same;
* decorrelation: paper = the d x d correlation matrix of the feature dimensions (each
  standardised over the n states; the papers' text: "different feature dimensions remain
  uncorrelated"), summed over :math:`m \ne n`; code = the n x n correlation matrix of the
  states (each standardised over its d features, the table's :math:`1/(d-1)`), *mean* over
  :math:`m \ne n`. (For the feature reading we divide by n - 1, so Cov is a correlation matrix.)

Other code details, not reproduced: one code version clamps cosines to ``[eps, 1 - eps]``
(negative cosines count as orthogonal; we clamp to ``[-1 + eps, 1 - eps]``, eps = 1e-4 as
there), one divides the squared l2 distance by d (= our ``tau`` times d), one keeps the
diagonal in the l2 sum; its norm term is ``0.1 * mean(z**2)`` (our ``norm_lambda = 0.1`` on the
same mean; the paper's :math:`\lambda_{norm}\|\mathcal{Z}\|_2^2`, given without a value, is the
same term up to the factor n d absorbed in :math:`\lambda_{norm}`).

Scope. ``flatten``: one group, every unmasked state of the batch (001 §3.4: "flattened across
batch and sequence"); ``sequence``: one group per sequence, the loss averaged over the
sequences with >= 2 unmasked states (the authors' code for 002/003, whose :math:`\mathcal{Z}` is
"a sequence of N tokens"). ``LossSpec.scope = None`` takes each paper's own choice: flatten for
the 001 losses, sequence for the 002/003 ones. The pairwise losses are O(n^2 d) per group of
n states (decorrelation O(n d min(n, d)), through the smaller Gram matrix); ``max_tokens`` caps
n by random subsampling of each sequence's unmasked positions (:func:`subsample_tokens`).

Layers (``LossSpec.where``). HF ``outputs.hidden_states`` has ``L + 1`` entries for an
``L``-block model: index ``0`` the embedding output (input of block 1), ``l`` in ``1..L-1``
the output of block ``l`` (residual stream, before the final norm), and index ``L`` the
output of block ``L`` *after the final norm* (GPT-2's ``ln_f``, Llama's ``norm``): the state
that feeds the LM head, ``final`` in :mod:`dispersion.measure.extract` and "final-layer hidden
states" in 001 §3.4. ``final`` = {L}; ``upper`` = {l : L/2 <= l <= L}; ``lower`` =
{l : 1 <= l <= L/2} (002 Table 3); ``all`` = 1..L (the embeddings are never used, as in the
authors' code). The loss is averaged over the chosen layers.

Registry. Each loss is one :class:`Loss` entry of :data:`LOSSES`, added with
:func:`register_loss` on a function ``fn(H, mask, call) -> scalar``: its name, family
(``cosine``: O(N d) over all states; ``pairwise``: O(n^2 d) per group, capped by ``max_tokens``),
default scope, accepted scopes, paper and formula. ``LossSpec.name`` and a sweep's
``grid.losses`` accept the registered names (and ``none``); the default scope, the options that
apply and the loss table of docs/TRAINING.md (:func:`losses_markdown`) all come from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field, model_validator

from dispersion.core.config import Strict
from dispersion.core.errors import ConfigError

__all__ = [
    "ARCCOS_EPS",
    "LOSSES",
    "Loss",
    "LossCall",
    "LossOptions",
    "LossSpec",
    "aux_training",
    "cross_domain_push_away",
    "decorrelation",
    "dispersion_loss",
    "l2_repel",
    "layer_indices",
    "loss_names",
    "losses_markdown",
    "make_aux_loss",
    "mean_cosine_distance",
    "orthogonalization",
    "push_away",
    "register_loss",
    "squeeze",
    "subsample_tokens",
]

Scope = Literal["flatten", "sequence"]
Where = Literal["final", "upper", "lower", "all"]
Form = Literal["paper", "code"]
Family = Literal["cosine", "pairwise"]

ARCCOS_EPS = 1e-4  # cosines are clamped to [-1 + eps, 1 - eps] before arccos (as the authors' code)
_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class LossCall:
    """What a registered loss receives besides the states ``H [B, T, d]`` and ``mask [B, T]``."""

    spec: LossSpec                       # every option of the loss (tau, norm_lambda, form, ...)
    scope: Scope                         # spec.scope, or the loss's default scope when unset
    domain: torch.Tensor | None = None   # [B] domain id of each row (batch.domain), if the batch has one

    @property
    def reduction(self) -> Literal["sum", "mean"]:
        """``sum`` for ``form: paper`` (log-sum, sum over pairs), ``mean`` for ``form: code``."""
        return "sum" if self.spec.form == "paper" else "mean"


LossFn = Callable[[torch.Tensor, "torch.Tensor | None", LossCall], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """One registered auxiliary loss (see :func:`register_loss`)."""

    name: str                       # the value of loss.name / grid.losses
    family: Family                  # cosine: O(N d) over all states; pairwise: O(n^2 d) per group
    scope: Scope                    # default scope, used when LossSpec.scope is unset
    paper: str                      # where it is defined
    formula: str                    # what is minimised (markdown, for the docs table)
    compute: LossFn                 # (H [B, T, d], mask [B, T] | None, call) -> scalar tensor
    scopes: tuple[Scope, ...] = ("flatten", "sequence")  # the scopes it accepts
    needs_domain: bool = False      # pairs rows of different domains: needs batch.domain, >= 2 domains

    @property
    def takes_max_tokens(self) -> bool:
        """Whether ``max_tokens`` applies: the pairwise losses may subsample, the cosine ones
        use every state (they are O(N d))."""
        return self.family == "pairwise"


LOSSES: dict[str, Loss] = {}
"""Every registered loss by name, in registration order (the order of the docs table)."""


def register_loss(name: str, *, family: Family, scope: Scope, paper: str, formula: str,
                  scopes: tuple[Scope, ...] = ("flatten", "sequence"),
                  needs_domain: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn(H, mask, call) -> scalar`` as the loss ``name`` in :data:`LOSSES`.

    ``fn`` gets the states ``H [B, T, d]`` of one layer (float32/64), the padding ``mask [B, T]``
    (``None`` = every position) and a :class:`LossCall` (the spec, the resolved scope, the rows'
    domains) and returns a scalar to minimise; autocast is off while it runs. Raises ValueError
    on a duplicate or malformed entry."""
    if not name.isidentifier() or name == "none":
        raise ValueError(f"register_loss: {name!r} is not a valid loss name")
    if name in LOSSES:
        raise ValueError(f"register_loss: loss {name!r} registered twice")
    if family not in get_args(Family):
        raise ValueError(f"register_loss: {name}: family must be one of {get_args(Family)}, got {family!r}")
    if not scopes or any(s not in get_args(Scope) for s in scopes) or scope not in scopes:
        raise ValueError(f"register_loss: {name}: default scope {scope!r} must be one of scopes {scopes!r} "
                         f"(each 'flatten' or 'sequence')")

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"register_loss: loss {name!r} registered twice")
        LOSSES[name] = Loss(name, family, scope, paper, formula, _full_precision(fn), tuple(scopes), needs_domain)
        return fn
    return add


def loss_names() -> tuple[str, ...]:
    """The accepted values of ``loss.name`` and ``grid.losses``: ``none`` and every registered loss."""
    return ("none", *LOSSES)


def _known_loss(name: str) -> str:
    if name != "none" and name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(loss_names())})")
    return name


LossName = Annotated[str, AfterValidator(_known_loss)]
"""A loss name checked against the registry when a config is validated."""


def losses_markdown(registry: Mapping[str, Loss] | None = None) -> str:
    """The generated loss table of docs/TRAINING.md (``registry`` defaults to :data:`LOSSES`)."""
    out = ["| loss | family | default scope | scopes | paper | minimises |", "|---|---|---|---|---|---|"]
    for loss in (LOSSES if registry is None else registry).values():
        out.append(f"| `{loss.name}` | {loss.family} | {loss.scope} | {', '.join(loss.scopes)} | {loss.paper} "
                   f"| {loss.formula} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- input handling


def _full_precision(fn: Callable) -> Callable:
    """Run a loss with autocast off: its cosines, Gram matrices and arccos are computed in the
    states' fp32 (``_prep`` upcasts bf16), never in bf16, where ``1 - ARCCOS_EPS`` rounds to 1
    and arccos' gradient at the clamp is infinite."""
    import functools

    @functools.wraps(fn)
    def wrapper(H, *args, **kwargs):
        if isinstance(H, torch.Tensor) and torch.is_autocast_enabled(H.device.type):
            with torch.autocast(device_type=H.device.type, enabled=False):
                return fn(H, *args, **kwargs)
        return fn(H, *args, **kwargs)
    return wrapper


def _prep(H: torch.Tensor, mask: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H as float32/64, mask as bool [B, T])``; raises ValueError on wrong shapes."""
    if not isinstance(H, torch.Tensor) or H.dim() != 3:
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"{name}: H must be a [B, T, d] tensor, got {shape}")
    if H.shape[-1] < 1:
        raise ValueError(f"{name}: H has no feature dimension, shape {tuple(H.shape)}")
    if H.dtype not in (torch.float32, torch.float64):
        H = H.float()
    if mask is None:
        m = torch.ones(H.shape[:2], dtype=torch.bool, device=H.device)
    else:
        if tuple(mask.shape) != tuple(H.shape[:2]):
            raise ValueError(f"{name}: mask must be [B, T] = {tuple(H.shape[:2])}, got {tuple(mask.shape)}")
        m = mask.to(device=H.device).bool()
    return H, m


def _check_scope(scope: str, name: str) -> str:
    if scope not in ("flatten", "sequence"):
        raise ValueError(f"{name}: scope must be 'flatten' or 'sequence', got {scope!r}")
    return scope


def _check_reduction(reduction: str, name: str) -> str:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{name}: reduction must be 'sum' (paper) or 'mean' (authors' code), got {reduction!r}")
    return reduction


def _unit(H: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Unit rows, masked rows set to 0 (so they get no gradient)."""
    return F.normalize(H, dim=-1, eps=_NORM_EPS) * m.unsqueeze(-1).to(H.dtype)


def _groups(H: torch.Tensor, m: torch.Tensor, scope: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X [G, n, d], valid [G, n])``: one group (all unmasked states) or one per sequence with
    >= 2 unmasked states; raises if no group has 2 states."""
    if scope == "flatten":
        X = H[m].unsqueeze(0)
        valid = torch.ones(X.shape[:2], dtype=torch.bool, device=H.device)
    else:
        keep = m.sum(1) >= 2
        X, valid = H[keep], m[keep]
    if X.shape[0] == 0 or X.shape[1] < 2:
        where = "the batch" if scope == "flatten" else "a sequence"
        raise ValueError(f"{name}: needs at least 2 unmasked states in {where}")
    return X, valid


def _pair_groups(H: torch.Tensor, mask: torch.Tensor | None, name: str, scope: str, *, reduction: str | None = None,
                 tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked inputs and options of a pairwise loss, as ``_groups`` (``X``, ``valid``)."""
    H, m = _prep(H, mask, name)
    _check_scope(scope, name)
    if reduction is not None:
        _check_reduction(reduction, name)
    if tau is not None and not tau > 0:
        raise ValueError(f"{name}: tau must be > 0, got {tau}")
    return _groups(H, m, scope, name)


def _pair_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[G, n, n]``: both states unmasked and i != j."""
    n = valid.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    return valid.unsqueeze(2) & valid.unsqueeze(1) & ~eye


def _angles(X: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """``D_ij = arccos(clamp(cos_ij, -1+eps, 1-eps)) / pi`` ``[G, n, n]`` (finite gradients)."""
    U = _unit(X, valid)
    C = U @ U.transpose(1, 2)
    return torch.arccos(C.clamp(-1.0 + eps, 1.0 - eps)) / math.pi


def _log_pair_sum(logits: torch.Tensor, pm: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per group ``log sum_{pairs} exp(logits)`` (``- log #pairs`` for 'mean'), ``[G]``."""
    lse = torch.logsumexp(logits.masked_fill(~pm, float("-inf")).flatten(1), dim=1)
    if reduction == "mean":
        lse = lse - torch.log(pm.flatten(1).sum(1).to(logits.dtype))
    return lse


# ----------------------------------------------------------------------------- paper 001


@_full_precision
def mean_cosine_distance(H: torch.Tensor, mask: torch.Tensor | None = None, scope: Scope = "flatten") -> torch.Tensor:
    r"""Mean pairwise cosine distance :math:`d = 1 - \frac{\|s\|^2 - \sum_i\|u_i\|^2}{N(N-1)}`, :math:`s=\sum_i u_i` (001 Eq. 1), O(N d).

    ``flatten``: over all N unmasked states of the batch; ``sequence``: per sequence (those
    with >= 2 unmasked states), then averaged over sequences. Differentiable.
    """
    name = "mean_cosine_distance"
    H, m = _prep(H, mask, name)
    _check_scope(scope, name)
    if scope == "flatten":
        n = int(m.sum())
        if n < 2:
            raise ValueError(f"{name}: needs at least 2 unmasked states in the batch, got {n}")
        H3, m2 = H.reshape(1, -1, H.shape[-1]), m.reshape(1, -1)
    else:
        if not bool((m.sum(1) >= 2).any()):
            raise ValueError(f"{name}: needs a sequence with at least 2 unmasked states")
        H3, m2 = H, m
    return _MeanCosineDistance.apply(H3, m2.to(H.dtype))


class _MeanCosineDistance(torch.autograd.Function):
    r"""Eq. 1 per group and its gradient in closed form: two reads of the states forward (norms,
    then the weighted sum s), two backward (the dots :math:`h_i \cdot s`, then the gradient
    written once), and no other tensor of their size (autograd through ``F.normalize`` keeps
    several). With :math:`r_i = \max(\|h_i\|, \epsilon)`, :math:`u_i = m_i h_i / r_i`,
    :math:`P = n(n-1)`: :math:`\partial D / \partial h_i = -\frac{2 m_i}{P r_i}
    \big(s - (u_i \cdot s)\, h_i / r_i\big)` for :math:`\|h_i\| \ge \epsilon`, and
    :math:`-\frac{2 m_i}{P \epsilon}(s - h_i / \epsilon)` below (where
    :math:`\|u_i\|^2 = \|h_i\|^2/\epsilon^2` is not constant)."""

    @staticmethod
    def forward(ctx, H: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # H [G, n, d], m [G, n] 0/1
        raw = torch.linalg.vector_norm(H, dim=-1)                     # [G, n]
        r = raw.clamp(min=_NORM_EPS)
        w = m / r                                                     # [G, n]
        s = torch.bmm(w.unsqueeze(1), H).squeeze(1)                   # [G, d] sum of unit states
        q = (m * (raw / r) ** 2).sum(1)                               # [G] sum of ||u_i||^2
        cnt = m.sum(1)                                                # [G]
        keep = cnt >= 2
        P = (cnt * (cnt - 1)).clamp(min=1)
        D = 1.0 - ((s * s).sum(1) - q) / P                            # [G]
        ctx.save_for_backward(H, m, raw, r, s, keep, P)
        return D[keep].mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        H, m, raw, r, s, keep, P = ctx.saved_tensors
        c = (g / keep.sum()) * keep.to(H.dtype) / P                   # [G] dloss/dD_G / P
        hs = torch.bmm(H, s.unsqueeze(-1)).squeeze(-1)                # [G, n] h_i . s
        small = raw < _NORM_EPS
        alpha = -2.0 * c[:, None] * m / r                             # [G, n]
        beta = 2.0 * c[:, None] * m * torch.where(small, 1.0 / (r * r), hs / (r * r * r))
        grad = H * beta.unsqueeze(-1)                                 # [G, n, d], the one write
        grad.baddbmm_(alpha.unsqueeze(-1), s.unsqueeze(1))           # += alpha_i s
        return grad, None


@_full_precision
def push_away(H: torch.Tensor, mask: torch.Tensor | None = None, scope: Scope = "flatten") -> torch.Tensor:
    r"""Push-away loss :math:`-d_{avg}`, :math:`d_{avg} = \frac{1}{N(N-1)}\sum_{i \ne j}(1 - \tilde h_i\cdot\tilde h_j)` (001 §3.4), O(N d) via :math:`\|\sum_i \tilde h_i\|^2`."""
    return -mean_cosine_distance(H, mask, scope)


@_full_precision
def squeeze(H: torch.Tensor, mask: torch.Tensor | None = None, scope: Scope = "flatten") -> torch.Tensor:
    r"""Squeeze ablation :math:`+d_{avg}` (001 B.4.2): minimises the mean pairwise cosine distance, O(N d)."""
    return mean_cosine_distance(H, mask, scope)


@_full_precision
def cross_domain_push_away(H: torch.Tensor, mask: torch.Tensor | None, domain: torch.Tensor) -> torch.Tensor:
    r"""Cross-domain push-away :math:`-d_\times`, :math:`d_\times = 1 - \frac{\|s\|^2 - \sum_k\|s_k\|^2}{N^2 - \sum_k n_k^2}` over pairs of different domains only (001 §3.4), O(N d).

    ``domain [B]``: any integer id per row (all states of a row share it). With two
    domains A and B this equals :math:`\frac{1}{|A||B|}\sum_{i\in A}\sum_{j\in B}(1 - u_i\cdot u_j)`.
    The batch is always flattened (pairs of one sequence never cross domains).
    """
    name = "cross_domain_push_away"
    H, m = _prep(H, mask, name)
    dom = torch.as_tensor(domain, device=H.device)
    if dom.dim() != 1 or dom.shape[0] != H.shape[0]:
        raise ValueError(f"{name}: domain must be [B] = [{H.shape[0]}], got {tuple(dom.shape)}")
    _, inv = torch.unique(dom, return_inverse=True)
    onehot = F.one_hot(inv, int(inv.max()) + 1).to(H.dtype)      # [B, K]
    U = _unit(H, m)
    S = onehot.T @ U.sum(1)                                       # [K, d] per-domain sums
    n_k = onehot.T @ m.sum(1).to(H.dtype)                         # [K]
    s = S.sum(0)
    n = n_k.sum()
    pairs = n * n - (n_k * n_k).sum()
    if pairs <= 0:
        got = int((n_k > 0).sum())
        raise ValueError(f"{name}: needs unmasked states of at least 2 domains in the batch, got {got}")
    cross = s @ s - (S * S).sum()
    return -(1.0 - cross / pairs)


# ----------------------------------------------------------------------------- papers 002 / 003


@_full_precision
def dispersion_loss(H: torch.Tensor, mask: torch.Tensor | None = None, tau: float = 1.0, *,
                    scope: Scope = "sequence", reduction: Literal["sum", "mean"] = "sum",
                    eps: float = ARCCOS_EPS) -> torch.Tensor:
    r"""Dispersion loss ("angular spread") :math:`\log\sum_{i \ne j}\exp(-\arccos(\cos(z_i,z_j))/(\pi\tau))` (002 Table 1 / slide formula, 003 Table 1).

    ``reduction="mean"``: :math:`\log\,\mathrm{mean}_{i \ne j}` (authors' code), the same minus
    :math:`\log n(n-1)`, identical gradient. Cosines are clamped to ``[-1+eps, 1-eps]`` before
    arccos, so identical (cos = 1) or opposite (cos = -1) pairs give finite (zero) gradients.
    Per group (sequence or flattened batch), averaged over groups. O(n^2) per group.
    """
    X, valid = _pair_groups(H, mask, "dispersion_loss", scope, reduction=reduction, tau=tau)
    D = _angles(X, valid, eps)
    return _log_pair_sum(-D / tau, _pair_mask(valid), reduction).mean()


@_full_precision
def orthogonalization(H: torch.Tensor, mask: torch.Tensor | None = None, margin: float = 0.5, *,
                      scope: Scope = "sequence", eps: float = ARCCOS_EPS) -> torch.Tensor:
    r"""Orthogonalization :math:`\mathrm{mean}_{i \ne j}\max(0, \tfrac12 - \arccos(\cos(z_i,z_j))/\pi)^2` (002/003 Table 1, margin 1/2 = orthogonal).

    Only pairs at an acute angle are pushed; per group, averaged over groups. O(n^2) per group.
    """
    X, valid = _pair_groups(H, mask, "orthogonalization", scope)
    pm = _pair_mask(valid)
    D = _angles(X, valid, eps)
    hinge = torch.clamp(margin - D, min=0.0).pow(2) * pm.to(D.dtype)
    return (hinge.flatten(1).sum(1) / pm.flatten(1).sum(1).to(D.dtype)).mean()


@_full_precision
def l2_repel(H: torch.Tensor, mask: torch.Tensor | None = None, tau: float = 1.0, norm_lambda: float = 0.1, *,
             scope: Scope = "sequence", reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    r"""l2-repel :math:`\log\sum_{i \ne j}\exp(-\|z_i - z_j\|^2/\tau) + \lambda_{norm}\,\overline{z^2}` (002/003 Table 1, with the norm term).

    :math:`\overline{z^2}` is the mean of the squared entries of the group's states (the
    authors' code: ``0.1 * (z**2).mean()``; the paper's :math:`\|\mathcal Z\|_2^2` up to the
    factor n d). Squared distances come from the Gram matrix of the centred states (distances
    are translation invariant), clamped at 0. ``reduction="mean"``: log-mean (same gradient).
    """
    X, valid = _pair_groups(H, mask, "l2_repel", scope, reduction=reduction, tau=tau)
    w = valid.unsqueeze(-1).to(X.dtype)
    cnt = valid.sum(1).to(X.dtype)                                   # [G]
    Xw = X * w
    norm_term = (Xw * Xw).sum(dim=(1, 2)) / (cnt * X.shape[-1])
    Xc = (X - Xw.sum(1, keepdim=True) / cnt[:, None, None]) * w
    sq = (Xc * Xc).sum(-1)
    D2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * (Xc @ Xc.transpose(1, 2))).clamp_min(0.0)
    lse = _log_pair_sum(-D2 / tau, _pair_mask(valid), reduction)
    return (lse + norm_lambda * norm_term).mean()


def _offdiag_sq_sum(X: torch.Tensor, over: Literal["rows", "cols"]) -> torch.Tensor:
    """``sum_{a != b} (x_a . x_b)^2`` over the rows (or columns) of each ``X [G, n, p]``, via
    ``||X X^T||_F^2 = ||X^T X||_F^2`` on the smaller Gram matrix, minus the diagonal."""
    n, p = X.shape[1], X.shape[2]
    G = X @ X.transpose(1, 2) if n <= p else X.transpose(1, 2) @ X
    total = (G * G).sum(dim=(1, 2))
    lens = (X * X).sum(-1 if over == "rows" else -2)
    return total - (lens * lens).sum(-1)


@_full_precision
def decorrelation(H: torch.Tensor, mask: torch.Tensor | None = None, *, scope: Scope = "sequence",
                  axis: Literal["feature", "token"] = "feature",
                  reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    r"""Decorrelation :math:`\sum_{m \ne n}\mathrm{Cov}_{mn}^2`, :math:`\mathrm{Cov} = \mathcal Z_c^\top\mathcal Z_c/(n-1)`, :math:`\mathcal Z_c` standardised (002/003 Table 1).

    ``axis="feature"`` (the papers' text: "different feature dimensions remain uncorrelated"):
    each of the d dimensions is standardised over the group's n states (mean, unbiased std),
    Cov is the d x d correlation matrix, the sum runs over its d(d-1) off-diagonal entries.
    ``axis="token"`` (authors' code): each state is standardised over its d features,
    :math:`\mathrm{Cov} = \mathcal Z_c\mathcal Z_c^\top/(d-1)` is the n x n correlation of the
    states (the table's 1/(d-1)). ``reduction="mean"`` divides by the number of off-diagonal
    entries (the code's ``.mean()``). Computed on the smaller of the two Gram matrices,
    O(n d min(n, d)); per group, averaged over groups.
    """
    name = "decorrelation"
    H, m = _prep(H, mask, name)
    _check_scope(scope, name)
    _check_reduction(reduction, name)
    if axis not in ("feature", "token"):
        raise ValueError(f"{name}: axis must be 'feature' (paper) or 'token' (authors' code), got {axis!r}")
    d = H.shape[-1]
    if d < 2:
        raise ValueError(f"{name}: needs d >= 2 features, got {d}")
    X, valid = _groups(H, m, scope, name)
    w = valid.unsqueeze(-1).to(X.dtype)
    if axis == "token":
        Z = X - X.mean(-1, keepdim=True)
        std = Z.pow(2).sum(-1, keepdim=True).div(d - 1).sqrt().clamp_min(_NORM_EPS)
        Xn = Z / std / math.sqrt(d - 1) * w                          # rows: unit-norm standardised states
        total = _offdiag_sq_sum(Xn, "rows")
        cnt = valid.sum(1).to(X.dtype)
        entries = cnt * (cnt - 1.0)
    else:
        cnt = valid.sum(1).to(X.dtype)[:, None, None]                # [G, 1, 1]
        mu = (X * w).sum(1, keepdim=True) / cnt
        Z = (X - mu) * w
        std = (Z.pow(2).sum(1, keepdim=True) / (cnt - 1.0)).sqrt().clamp_min(_NORM_EPS)
        Xn = Z / std / (cnt - 1.0).sqrt()                            # columns: unit-norm standardised dims
        total = _offdiag_sq_sum(Xn, "cols")
        entries = torch.full_like(total, float(d * (d - 1)))
    if reduction == "mean":
        total = total / entries
    return total.mean()


# ----------------------------------------------------------------------------- registered losses
# d = mean over ordered pairs i != j of 1 - cos(h_i, h_j); D_ij = arccos(cos(z_i, z_j)) / pi.


@register_loss("push_away", family="cosine", scope="flatten", paper="001 §3.4",
               formula="`−d`, `d = mean_{i≠j} (1 − cos(h_i, h_j))`")
def _push_away(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    return push_away(H, mask, call.scope)


@register_loss("cross_domain", family="cosine", scope="flatten", scopes=("flatten",), needs_domain=True,
               paper="001 §3.4", formula="`−d` over the pairs of states from different domains")
def _cross_domain(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    return cross_domain_push_away(H, mask, call.domain)


@register_loss("squeeze", family="cosine", scope="flatten", paper="001 B.4.2",
               formula="`+d` (the ablation: pulls the states together)")
def _squeeze(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    return squeeze(H, mask, call.scope)


@register_loss("dispersion", family="pairwise", scope="sequence", paper="002 Table 1, 003 Table 1",
               formula="`log Σ_{i≠j} exp(−D_ij/τ)`, `D_ij = arccos(cos(z_i, z_j))/π`")
def _dispersion(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    return dispersion_loss(H, mask, call.spec.tau, scope=call.scope, reduction=call.reduction)


@register_loss("decorrelation", family="pairwise", scope="sequence", paper="002 Table 1, 003 Table 1",
               formula="`Σ_{m≠n} Cov_mn²`, Cov the correlation matrix of the d features "
                       "(form code: of the n states, mean over m ≠ n)")
def _decorrelation(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    axis = "feature" if call.spec.form == "paper" else "token"
    return decorrelation(H, mask, scope=call.scope, axis=axis, reduction=call.reduction)


@register_loss("l2_repel", family="pairwise", scope="sequence", paper="002 Table 1, 003 Table 1",
               formula="`log Σ_{i≠j} exp(−‖z_i − z_j‖²/τ) + λ_norm mean(z²)`")
def _l2_repel(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    return l2_repel(H, mask, call.spec.tau, call.spec.norm_lambda, scope=call.scope, reduction=call.reduction)


@register_loss("orthogonal", family="pairwise", scope="sequence", paper="002 Table 1, 003 Table 1",
               formula="`mean_{i≠j} max(0, ½ − D_ij)²`")
def _orthogonal(H: torch.Tensor, mask: torch.Tensor | None, call: LossCall) -> torch.Tensor:
    return orthogonalization(H, mask, 0.5, scope=call.scope)


# ----------------------------------------------------------------------------- subsampling, layers


def _sample_index(m: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``[B, k]`` positions per row: a uniform random subset of the unmasked ones first (in
    increasing position order), padded with masked positions when a row has fewer than k."""
    B, T = m.shape
    scores = torch.rand(B, T, generator=generator, dtype=torch.float64).to(m.device)
    scores = scores.masked_fill(~m, 2.0)                             # masked positions sort last
    idx = scores.argsort(dim=1)[:, :k]
    return idx.sort(dim=1).values


def subsample_tokens(H: torch.Tensor, mask: torch.Tensor | None, max_tokens: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``max_tokens`` unmasked states per sequence, chosen uniformly at random
    (without replacement) from a CPU ``torch.Generator``: ``(H [B, k, d], mask [B, k])`` with
    ``k = min(max_tokens, T)``; the same generator state gives the same positions."""
    name = "subsample_tokens"
    H, m = _prep(H, mask, name)
    if int(max_tokens) != max_tokens or max_tokens < 1:
        raise ValueError(f"{name}: max_tokens must be a positive integer, got {max_tokens!r}")
    k = min(int(max_tokens), H.shape[1])
    idx = _sample_index(m, k, generator)
    return H.gather(1, idx.unsqueeze(-1).expand(-1, -1, H.shape[-1])), m.gather(1, idx)


def layer_indices(n_hidden_states: int, where: Where) -> list[int]:
    """Indices into HF ``hidden_states`` (``L + 1`` entries, see the module doc) for ``where``:
    ``final`` [L], ``upper`` l in [L/2, L], ``lower`` l in [1, L/2] (at least layer 1), ``all`` 1..L."""
    L = int(n_hidden_states) - 1
    if L < 1:
        raise ValueError(f"layer_indices: hidden_states needs >= 2 entries (embeddings + blocks), "
                         f"got {n_hidden_states}")
    if where == "final":
        return [L]
    if where == "upper":
        return [k for k in range(1, L + 1) if 2 * k >= L]
    if where == "lower":
        return [k for k in range(1, L + 1) if 2 * k <= L] or [1]
    if where == "all":
        return list(range(1, L + 1))
    raise ValueError(f"layer_indices: where must be final, upper, lower or all, got {where!r}")


# ----------------------------------------------------------------------------- spec and trainer hook


class LossOptions(Strict):
    """The options of an auxiliary loss other than which loss and its weight (see
    :class:`LossSpec`); a training sweep shares them across its arms."""

    tau: Annotated[float, Field(gt=0)] = 1.0
    norm_lambda: Annotated[float, Field(ge=0)] = 0.1
    scope: Scope | None = None
    max_tokens: Annotated[int, Field(ge=2)] | None = None
    where: Where = "final"
    form: Form = "paper"
    seed: int = 0


class LossSpec(LossOptions):
    """Which auxiliary loss to add to next-token cross entropy, ``CE + lam * loss``.

    ``name``: ``none`` or a registered loss (:data:`LOSSES`, the table in docs/TRAINING.md):
    ``push_away`` / ``cross_domain`` / ``squeeze`` (001 §3.4, B.4.2) | ``dispersion`` /
    ``decorrelation`` / ``l2_repel`` / ``orthogonal`` (002/003 Table 1).
    ``lam``: the weight λ (001 B.4.1 sweeps 0.001..0.5; 002 Table 4: 0.1), applied by the trainer
    as ``TrainSpec.aux_lambda`` (:func:`aux_training`). ``tau``: temperature of ``dispersion`` and
    ``l2_repel`` (002 Table 4 best: 1.0; the authors' code defaults to 0.5). ``norm_lambda``:
    weight of l2-repel's norm term (0.1 as in the authors' code; the papers give no value).
    ``scope``: ``flatten`` | ``sequence`` | ``None`` = the loss's default (its paper's own: flatten
    for the 001 losses, sequence for 002/003); a loss may accept only some scopes. ``max_tokens``:
    cap on the states per sequence for the pairwise losses (random subset, seeded; see
    :func:`make_aux_loss`). ``where``: layers, see :func:`layer_indices`. ``form``: ``paper`` |
    ``code``, see the module doc.
    """

    name: LossName = "none"
    lam: Annotated[float, Field(ge=0)] = 0.1

    @model_validator(mode="after")
    def _check(self) -> LossSpec:
        loss = LOSSES.get(self.name)
        if loss is not None and self.scope is not None and self.scope not in loss.scopes:
            raise ValueError(f"scope: {self.name} takes only {' or '.join(map(repr, loss.scopes))} "
                             f"(or leave it unset), got {self.scope!r}")
        if self.max_tokens is not None and (loss is None or not loss.takes_max_tokens):
            pairwise = ", ".join(n for n, x in LOSSES.items() if x.takes_max_tokens)
            why = "no loss is selected" if loss is None else f"{self.name} is O(N d) over all states"
            raise ValueError(f"max_tokens: only for the pairwise losses {pairwise} ({why})")
        return self

    @property
    def loss(self) -> Loss | None:
        """The registry entry of ``name`` (``None`` for ``none``)."""
        return LOSSES.get(self.name)

    @property
    def resolved_scope(self) -> Scope:
        """``scope``, or the loss's default scope when unset."""
        if self.scope is not None:
            return self.scope
        loss = self.loss
        return loss.scope if loss is not None else "flatten"


def make_aux_loss(spec: LossSpec) -> Callable[[Any, Any], torch.Tensor] | None:
    """``aux_loss(outputs, batch) -> scalar`` for :func:`dispersion.training.train.train` (``None`` for ``none``).

    Returns the *unweighted* loss (the trainer adds ``TrainSpec.aux_lambda * aux`` and logs
    ``aux``; set ``aux_lambda = spec.lam``, e.g. with :func:`aux_training`). Reads
    ``outputs.hidden_states`` at the layers of ``spec.where`` (cast to float32), the padding
    mask ``batch.attention_mask`` when the batch has one (the trainer's batches have no padding),
    and ``batch.domain`` for a loss that pairs domains (``cross_domain``); calls the registered
    function of ``spec.name`` on each layer and averages over the layers. With ``max_tokens``, the
    same positions are kept in every layer, drawn from a ``torch.Generator`` seeded with
    ``spec.seed`` and one draw of torch's global RNG, which ``train`` reseeds at every
    micro-step: runs, and resumed runs, are deterministic.
    """
    loss = spec.loss
    if loss is None:
        return None
    scope = spec.resolved_scope

    def aux_loss(outputs: Any, batch: Any) -> torch.Tensor:
        hs = getattr(outputs, "hidden_states", None)
        if hs is None:
            raise ValueError("aux_loss: outputs have no hidden_states (call the model with output_hidden_states=True)")
        mask = getattr(batch, "attention_mask", None)
        domain = getattr(batch, "domain", None)
        if loss.needs_domain:
            if domain is None:
                raise ConfigError(f"loss.name: {loss.name} needs batch.domain")
            n_dom = int(torch.unique(torch.as_tensor(domain)).numel())
            if n_dom < 2:
                raise ConfigError(f"loss.name: {loss.name} needs rows of at least 2 domains per batch, got {n_dom} "
                                  f"(train on several domains)")
        call = LossCall(spec, scope, domain)
        idx = None
        if spec.max_tokens is not None:
            B, T = hs[-1].shape[:2]
            valid = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()
            draw = int(torch.randint(0, 2**62, (1,)))
            gen = torch.Generator().manual_seed((spec.seed * 1_000_003 + draw) % 2**63)
            idx = _sample_index(valid, min(spec.max_tokens, T), gen)
        losses = []
        for layer in layer_indices(len(hs), spec.where):
            H = hs[layer]
            H = H if H.dtype in (torch.float32, torch.float64) else H.float()
            m = None if mask is None else torch.as_tensor(mask, device=H.device).bool()
            if idx is not None:
                ix = idx.to(H.device)
                H = H.gather(1, ix.unsqueeze(-1).expand(-1, -1, H.shape[-1]))
                m = None if m is None else m.gather(1, ix)
            losses.append(loss.compute(H, m, call))
        return torch.stack(losses).mean()

    aux_loss.__doc__ = f"{spec.name} loss ({spec.model_dump_json()})"
    aux_loss.spec = spec  # type: ignore[attr-defined]
    return aux_loss


def aux_training(train_spec: Any, spec: LossSpec) -> tuple[Any, Callable | None]:
    """``(train_spec with aux_lambda = spec.lam, make_aux_loss(spec))``: the two things
    ``train(model, tokens, train_spec, aux_loss=...)`` needs (``aux_lambda = 0`` for ``none``)."""
    lam = 0.0 if spec.name == "none" else float(spec.lam)
    return train_spec.model_copy(update={"aux_lambda": lam}), make_aux_loss(spec)
