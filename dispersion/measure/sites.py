r"""The hook-site registry: which state of a decoder block a site names, and where to read it.

One entry per site (see :mod:`dispersion.measure.capture` for the notation and the engine
that reads them). This module needs no torch, so configs validate site names cheaply.

For a serial pre-norm block l (GPT-2, Llama, Mistral, Qwen, Gemma-2, OLMo-2 with its
post-norms; paper 001 Sec. 2.1 and 3.3):

.. math::
    a_l = \mathrm{Attn}_l(\mathrm{LN}_{l,1}(h_{l-1})), \quad
    r_l = h_{l-1} + a_l, \quad
    m_l = \mathrm{MLP}_l(\mathrm{LN}_{l,2}(r_l)), \quad
    h_l = r_l + m_l.

=============  ============================================  ===========================================
site           state                                         read at
=============  ============================================  ===========================================
``block``      :math:`h_l` (paper 001 Sec. 3.3: h_ffn)       block l's output
``attn``       :math:`a_l`, before the residual add          the attention module's output
``mlp``        :math:`m_l`, before the residual add          the MLP module's output
``resid_mid``  :math:`r_l = h_{l-1} + a_l` (Sec. 3.3: h_att)  the input of the MLP's pre-norm
``mlp_in``     :math:`\mathrm{LN}_{l,2}(r_l)`                the MLP module's input (kNN-LM's key)
=============  ============================================  ===========================================

Per family: GPT-2 reads ``resid_mid`` at the input of ``ln_2`` and ``mlp_in`` at the input of
``mlp`` (= ``ln_2``'s output); Llama, Mistral, Qwen and serial GPT-NeoX at the input of
``post_attention_layernorm`` (their MLP pre-norm) and of ``mlp``; MPT at the input of
``norm_2`` (its MLP is ``ffn``); Gemma-2/3 at the input of
``pre_feedforward_layernorm`` (their ``post_attention_layernorm`` normalises :math:`a_l`, so
:math:`r_l = h_{l-1} + \mathrm{LN}(a_l)` there) and of ``mlp``. OLMo-2 has no MLP pre-norm
(its norms follow each sub-layer, :math:`r_l = h_{l-1} + \mathrm{LN}(a_l)`): its
``post_attention_layernorm`` is passed over because the block also has a
``post_feedforward_layernorm``, and both ``resid_mid`` and ``mlp_in`` are the MLP's input
(the MLP's input stands for ``resid_mid`` only in such post-norm blocks).
Blocks with a parallel residual (GPT-J, Phi-1/2, Falcon, GPT-NeoX with
``use_parallel_residual``, Cohere: :math:`h_l = h_{l-1} + a_l + m_l` with both sub-layers
reading :math:`h_{l-1}`) never form :math:`r_l`; ``resid_mid`` is an error there, ``mlp_in`` is
the MLP's normalised input :math:`\mathrm{LN}(h_{l-1})`.
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
        not_with: ``(module, other)`` pairs: ``module`` is passed over in a block that also
            has ``other`` (a family where the same name is another norm, e.g. OLMo-2's
            ``post_attention_layernorm`` beside its ``post_feedforward_layernorm``).
        only_with: ``(module, other)`` pairs: ``module`` is taken only in a block that also
            has ``other`` (e.g. the MLP's input as ``resid_mid`` only in post-norm blocks).
        serial_only: the state exists only in blocks whose MLP reads the attention's
            residual stream; a model with a parallel residual (:func:`parallel_residual`)
            is an error.
    """

    name: str
    formula: str
    modules: tuple[str, ...] = ()
    read: Literal["input", "output"] = "output"
    residual: bool = False
    not_with: tuple[tuple[str, str], ...] = ()
    only_with: tuple[tuple[str, str], ...] = ()
    serial_only: bool = False

    def module(self, block: nn.Module, config: object | None = None) -> nn.Module:
        """The module of ``block`` whose input or output is this site's state (``config``, the
        model's config, is checked for a parallel residual when the site needs a serial block).

        Raises:
            ModelError: no such module, or a parallel-residual model for a serial-only site.
        """
        if self.serial_only and config is not None and parallel_residual(config):
            kind = getattr(_text_config(config), "model_type", "?")
            raise ModelError(f"extraction.sites: site {self.name!r} does not exist in {kind!r} blocks: attention and "
                             f"MLP both read h_(l-1) in parallel, so there is no residual stream between them")
        if not self.modules:
            return block
        skip = {m for m, other in self.not_with if hasattr(block, other)}
        skip |= {m for m, other in self.only_with if not hasattr(block, other)}
        return find_child(block, [m for m in self.modules if m not in skip], self.name)


SITES: dict[str, HookSite] = {s.name: s for s in (
    HookSite("block", "h_l = h_{l-1} + a_l + m_l (block l's output, the residual stream)", residual=True),
    HookSite("attn", "a_l = Attn_l(LN_{l,1}(h_{l-1})) (before the residual add)",
             ("self_attn", "attn", "attention")),
    HookSite("mlp", "m_l = MLP_l(LN_{l,2}(h_{l-1} + a_l)) (before the residual add)",
             ("mlp", "feed_forward", "ffn")),
    HookSite("resid_mid", "r_l = h_{l-1} + a_l (the residual stream between attention and MLP; "
             "paper 001 Sec. 3.3's h_att)",
             ("pre_feedforward_layernorm", "ln_2", "norm_2", "post_attention_layernorm", "mlp"), read="input",
             not_with=(("post_attention_layernorm", "post_feedforward_layernorm"),),
             only_with=(("mlp", "post_feedforward_layernorm"),), serial_only=True),
    HookSite("mlp_in", "LN_{l,2}(h_{l-1} + a_l) (the MLP's normalised input; the kNN-LM key of "
             "knn-transformers)", ("mlp", "feed_forward", "ffn"), read="input"),
)}
"""The hookable sites, by name (see :class:`HookSite`)."""

PARALLEL_FAMILIES: tuple[str, ...] = ("gptj", "codegen", "phi", "cohere", "cohere2")
"""``model_type`` of families whose blocks always add attention and MLP in parallel."""


def _text_config(config: object) -> object:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def parallel_residual(config: object) -> bool:
    """Whether a model config's blocks compute :math:`h_l = h_{l-1} + a_l + m_l` with attention
    and MLP both reading :math:`h_{l-1}` (GPT-J, Phi-1/2, Cohere, Falcon's ``parallel_attn`` or
    new decoder, GPT-NeoX's ``use_parallel_residual``)."""
    cfg = _text_config(config)
    if any(getattr(cfg, flag, False) is True
           for flag in ("use_parallel_residual", "parallel_attn", "new_decoder_architecture")):
        return True
    return getattr(cfg, "model_type", None) in PARALLEL_FAMILIES


def find_child(block: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    """The first attribute of ``block`` among ``names`` (the ``what`` sub-module)."""
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise ModelError(f"extraction.sites: {type(block).__name__} has no {what} module (looked for {list(names)})")
