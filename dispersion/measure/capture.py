r"""Hidden states read by forward hooks: sites, layer names, BOS, and one capture engine.

A decoder of n pre-norm blocks computes, for block l = 1..n (paper 001 Sec. 2.1),

.. math::
    a_l = \mathrm{Attn}_l(\mathrm{LN}_{l,1}(h_{l-1})), \quad
    m_l = \mathrm{MLP}_l(\mathrm{LN}_{l,2}(h_{l-1} + a_l)), \quad
    h_l = h_{l-1} + a_l + m_l,

from the embeddings :math:`h_0`, and the LM head reads :math:`\mathrm{LN}_f(h_n)` (the
paper's :math:`h_N`). A *target* ``(layer, site)`` names one of these states:

* layers: ``'0'`` = :math:`h_0`, the input of block 1 (token embeddings, plus position
  embeddings for GPT-2); ``'1'..'n'`` = block ``l``; ``'final'`` = :math:`\mathrm{LN}_f(h_n)`,
  the final norm's output (HF's ``hidden_states[-1]``);
* sites (:data:`SITES`): ``block`` = :math:`h_l` (the residual stream, before the final
  norm), ``attn`` = :math:`a_l`, ``mlp`` = :math:`m_l` (sub-layer outputs before the
  residual add; for Gemma-2 before its post-sub-layer norms), ``resid_mid`` =
  :math:`h_{l-1} + a_l` (the residual stream between the sub-layers, paper 001 Sec. 3.3's
  :math:`h_{att}`; read as the input of the MLP's pre-norm) and ``mlp_in`` =
  :math:`\mathrm{LN}_{l,2}(h_{l-1} + a_l)` (the MLP's input, read by a forward pre-hook;
  the kNN-LM key). Per-family details are in :mod:`dispersion.measure.sites`. Only
  ``block`` exists at layers ``0`` and ``final``.

:class:`Capture` registers hooks on just the modules of the requested targets and hands
each state, shape ``[B, T, d]``, to a *reducer* ``reduce(target, hidden)`` while the
forward pass runs, so a caller keeps only what it reduces (pooled vectors, a last-position
state, pairwise histograms), never all layers x tokens. With ``stop_early`` the pass ends
after the deepest requested block when no ``final`` target is asked for.

A new site is one entry of :data:`dispersion.measure.sites.SITES` (the module to find in a decoder block and whether
its input or its output is the state); the config's ``extraction.sites`` and
``analysis.site`` accept the registered names.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Self, cast

import torch
from torch import nn

from dispersion.core.errors import ModelError
from dispersion.measure.sites import SITES

Target = tuple[str, str]  # (layer name, site)
Reducer = Callable[[Target, torch.Tensor], None]  # reduce(target, hidden [B, T, d])


# --------------------------------------------------------------------------- #
# sites
# --------------------------------------------------------------------------- #



# --------------------------------------------------------------------------- #
# layer names and targets
# --------------------------------------------------------------------------- #
def layer_names(layers: Sequence[int | str], n_layers: int) -> list[str]:
    """Normalize configured layers to names ``'0'..'n'`` and ``'final'``; ``all`` = every one.

    Raises:
        ModelError: a layer out of range (names ``extraction.layers``).
    """
    out: list[str] = []
    for ref in layers:
        if ref == "all":
            names = [str(i) for i in range(n_layers + 1)] + ["final"]
        elif ref == "final":
            names = ["final"]
        elif isinstance(ref, int) and 0 <= ref <= n_layers:
            names = [str(ref)]
        else:
            raise ModelError(f"extraction.layers: layer {ref!r} out of range 0..{n_layers} (or 'final', 'all')")
        out.extend(n for n in names if n not in out)
    return out


def targets(layers: Sequence[str], sites: Sequence[str]) -> list[Target]:
    """(layer, site) pairs, layer-major; non-residual sites exist for blocks 1..n only.

    Raises:
        ModelError: an unknown site (names ``extraction.sites``).
    """
    for site in sites:
        if site not in SITES:
            raise ModelError(f"extraction.sites: unknown site {site!r} (known: {', '.join(SITES)})")
    return [(layer, site) for layer in layers for site in sites
            if SITES[site].residual or layer not in ("0", "final")]


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #
def find_blocks(base: nn.Module, n_layers: int) -> nn.ModuleList:
    """The decoder blocks of a base model: its first ``ModuleList`` of ``n_layers`` modules."""
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ModelError(f"cannot find the {n_layers} decoder blocks of {type(base).__name__}")


def first_output(output: Any) -> Any:
    """A module's main output: the first element of a tuple/list output, else the output."""
    return output[0] if isinstance(output, (tuple, list)) else output


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's main input from a forward pre-hook's ``(args, kwargs)``: the first positional
    argument, else the ``hidden_states`` keyword."""
    return args[0] if args else kwargs["hidden_states"]


def final_hidden(output: Any) -> torch.Tensor:
    """The final-norm states ``[B, T, d]`` from a base model's output."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else first_output(output)


# --------------------------------------------------------------------------- #
# BOS
# --------------------------------------------------------------------------- #
def bos_or_eos(source: Any) -> int | None:
    """The token fed before a segment: ``source``'s BOS id, else its EOS id, else None.

    ``source`` is a tokenizer, a model config (its text config for multimodal ones), or a
    model (its config). A list of ids (some configs list several EOS ids) gives its first.
    EOS is the one fallback: GPT-2's only special token, ``<|endoftext|>``, is its EOS.
    """
    if isinstance(source, nn.Module):
        source = source.config
    if hasattr(source, "get_text_config"):
        source = source.get_text_config()
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(source, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def resolve_bos(source: Any, field: str) -> int:
    """The BOS id for ``prepend_bos``: an ``int`` as given, else :func:`bos_or_eos` of ``source``.

    Raises:
        ModelError: ``source`` is None or declares neither BOS nor EOS; the message starts with
            ``field`` (e.g. ``extraction.prepend_bos``, which then suggests turning it off).
    """
    if isinstance(source, numbers.Integral) and not isinstance(source, bool):
        return int(source)
    bos = None if source is None else bos_or_eos(source)
    if bos is None:
        what = "no BOS token id was given" if source is None else \
            f"{type(source).__name__} declares no BOS (or EOS) token"
        hint = "; set prepend_bos: false" if field.endswith("prepend_bos") else ""
        raise ModelError(f"{field}: {what}{hint}")
    return bos


# --------------------------------------------------------------------------- #
# capture
# --------------------------------------------------------------------------- #
class _StopForward(Exception):
    """Raised by the stop hook once every requested state has been reduced."""


class Capture:
    """Forward hooks that hand the states of ``targets`` to ``reduce`` during a forward pass.

    Use as a context manager (hooks are registered on enter, removed on exit) and run the
    model with :meth:`forward`::

        with Capture(model, [("1", "block"), ("final", "block")], reduce) as cap:
            hidden = cap.forward(input_ids=ids, attention_mask=mask)  # [B, T, d]

    ``reduce(target, hidden)`` receives ``hidden`` of shape ``[B, T, d]`` in the model's
    dtype, in forward order; the ``final`` targets after the pass. Hooks on one module fire
    in target order.

    Args:
        model: a ``transformers`` causal LM (its ``base_model`` is run, not the LM head).
        targets: ``(layer, site)`` pairs (:func:`targets`).
        reduce: the reducer.
        stop_early: end the pass after the deepest requested block when no ``final`` target
            is asked for (:meth:`forward` then returns None); for callers that need neither
            the final states nor logits.
    """

    def __init__(self, model: nn.Module, targets: Sequence[Target], reduce: Reducer, *,
                 stop_early: bool = False):
        from dispersion.measure.modeling import num_layers

        self.base = cast(nn.Module, model.base_model)  # nn.Module.__getattr__ is typed Tensor | Module
        self.targets = list(targets)
        self.reduce = reduce
        self.final = [t for t in self.targets if t[0] == "final"]
        blocks = [t for t in self.targets if t[0] != "final"]
        n_layers = num_layers(model.config)
        self.blocks = find_blocks(self.base, n_layers) if blocks else None
        # (module, "pre" | "post", target) per hooked target, resolved now so errors come early
        self._plan: list[tuple[nn.Module, str, Target]] = []
        for layer, site in blocks:
            assert self.blocks is not None  # found above: blocks is non-empty
            spec = SITES[site]
            if layer == "0":
                if not spec.residual:
                    raise ModelError(f"extraction.sites: site {site!r} does not exist at layer 0")
                self._plan.append((self.blocks[0], "pre", (layer, site)))
            else:
                module = spec.module(self.blocks[int(layer) - 1], model.config)
                self._plan.append((module, "pre" if spec.read == "input" else "post", (layer, site)))
        self.deepest = max((int(t[0]) for t in blocks), default=None) \
            if stop_early and not self.final else None
        self._handles: list = []

    def __enter__(self) -> Self:
        try:
            for module, kind, target in self._plan:
                if kind == "pre":
                    def pre(_m, args, kwargs, t=target):
                        self.reduce(t, first_input(args, kwargs))
                    self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(_m, _args, output, t=target):
                        self.reduce(t, first_output(output))
                    self._handles.append(module.register_forward_hook(post))
            if self.deepest is not None:  # registered last: fires after the deepest block's reducers
                assert self.blocks is not None  # deepest is only set when there are block targets

                def stop(*_):
                    raise _StopForward
                self._handles.append(self.blocks[0].register_forward_pre_hook(stop) if self.deepest == 0
                                     else self.blocks[self.deepest - 1].register_forward_hook(stop))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, **inputs: Any) -> torch.Tensor | None:
        """Run the base model on ``inputs`` (``input_ids``, ``attention_mask``; no KV cache),
        reduce the ``final`` targets, and return the final-norm states ``[B, T, d]``, or
        None when the pass stopped early."""
        try:
            out = self.base(**inputs, use_cache=False)
        except _StopForward:
            return None
        hidden = final_hidden(out)
        for t in self.final:
            self.reduce(t, hidden)
        return hidden

    def forward_cached(self, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """As :meth:`forward`, keeping the KV cache: returns the final-norm states ``[B, T, d]``
        and the base model's ``past_key_values``, from which a caller scores continuations of
        these inputs without running them again (the multiple-choice cloze of
        :mod:`dispersion.measure.queries`). Not for a capture that stops early."""
        if self.deepest is not None:
            raise ModelError("Capture.forward_cached: a pass that stops early keeps no cache")
        out = self.base(**inputs, use_cache=True)
        hidden = final_hidden(out)
        for t in self.final:
            self.reduce(t, hidden)
        # transformers >= 5.2x names the cache ``cache``, earlier versions ``past_key_values``
        return hidden, out["cache"] if "cache" in out else out["past_key_values"]
