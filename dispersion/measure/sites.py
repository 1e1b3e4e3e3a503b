"""The hook-site registry: which state of a decoder block a site names, and where to read it.

One entry per site (see :mod:`dispersion.measure.capture` for the notation and the engine
that reads them). This module needs no torch, so configs validate site names cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dispersion.core.errors import ModelError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class HookSite:
    """Where a site's state is read in decoder block l.

    Attributes:
        name: the site's name in ``extraction.sites``.
        formula: the state, in the notation of the module doc.
        modules: attribute names of the block's child module, tried in order (one per model
            family); empty = the block itself.
        read: ``output`` (the module's first output) or ``input`` (its first input).
        residual: the site is the residual stream itself, so it also exists at layer ``0``
            (input of block 1) and ``final`` (final-norm output); other sites exist at
            layers 1..n only.
    """

    name: str
    formula: str
    modules: tuple[str, ...] = ()
    read: Literal["input", "output"] = "output"
    residual: bool = False

    def module(self, block: nn.Module) -> nn.Module:
        """The module of ``block`` whose input or output is this site's state."""
        return find_child(block, self.modules, self.name) if self.modules else block


SITES: dict[str, HookSite] = {s.name: s for s in (
    HookSite("block", "h_l = h_{l-1} + a_l + m_l (block l's output, the residual stream)", residual=True),
    HookSite("attn", "a_l = Attn_l(LN_{l,1}(h_{l-1})) (before the residual add)",
             ("self_attn", "attn", "attention")),
    HookSite("mlp", "m_l = MLP_l(LN_{l,2}(h_{l-1} + a_l)) (before the residual add)",
             ("mlp", "feed_forward", "ffn")),
)}
"""The hookable sites, by name (see :class:`HookSite`)."""


def find_child(block: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    """The first attribute of ``block`` among ``names`` (the ``what`` sub-module)."""
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise ModelError(f"extraction.sites: {type(block).__name__} has no {what} module (looked for {list(names)})")
