"""One forward pass per batch of segments: perplexity and pooled hidden states.

Per segment ``x_1..x_L`` (paper 001 Sec. 2.1 and footnote 2):

* ``nll_sum = -sum_t log p(x_t | x_<t)`` over the scored tokens, ``n_scored`` of them, and
  ``ppl = exp(nll_sum / n_scored)``. With ``prepend_bos`` the model sees ``[BOS] x_1..x_L``
  and all L tokens are scored; without it, ``x_1`` has no context and L-1 are scored.
* ``last_token_nll = -log p(x_L | x_<L)``; ``last_nll_c{c} = -log p(x_c | x_<c)``, the
  last-token NLL of the prefix of length c (paper 001 Fig. 4), read from the same pass
  because the model is causal.

Hidden states are read by :class:`dispersion.measure.capture.Capture` (forward hooks on just
the requested modules) and reduced inside the hook, so memory is O(batch x d) per target,
never all layers x tokens:

* layers ``0``..``n`` and ``final``, sites ``block``, ``attn``, ``mlp``: as defined in
  :mod:`dispersion.measure.capture` (``0`` = input of block 1, ``l`` = block ``l``'s output
  before the final norm, ``final`` = the final norm's output, which feeds the LM head).
* pools ``last`` (state at the last token) and ``mean`` (mean over kept positions); pool
  ``context`` adds, for every context length c, pool ``c{c}``: the state at segment token
  c, i.e. the last-token state of the prefix x_1..x_c (the model is causal, so it equals
  the last state of a segment of length c), with ``next_nll_c{c} = -log p(x_{c+1} | x_<=c)``,
  the NLL of the prediction that state makes (paper 001 Fig. 4).
* ``within``: the within-segment token dispersion, mean pairwise cosine distance among the
  kept token states, in O(L d): with unit rows u_t, ``1 - (|sum u|^2 - n) / (n (n-1))``.

Kept positions exclude the BOS position and then the first ``skip_first`` segment tokens
(their outlier activations, "attention sinks", skew cosine geometry). The perplexity
always covers the whole segment.

Token NLL is computed in chunks of at most ``nll_chunk_tokens`` rows through the LM head
(:class:`dispersion.measure.head.Head`, fused with ``extraction.fused_head``), and at most
``LOGIT_BUDGET`` fp32 logits at once, so memory never grows as batch x sequence x vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dispersion.core.errors import ModelError, NonFiniteError
from dispersion.core.threads import follow_share
from dispersion.measure.capture import (
    Capture,
    Target,
    find_blocks,
    layer_names,
    resolve_bos,
    targets,
)
from dispersion.measure.compiled import CompiledBlocks
from dispersion.measure.head import Head

__all__ = ["Extracted", "Extractor", "layer_names", "targets", "within_segment"]



@dataclass
class Extracted:
    """Numpy results for a list of segments, in input order."""

    features: dict[str, np.ndarray]
    vectors: dict[tuple[str, str, str], np.ndarray]  # (layer, site, pool) -> float16 [N, d]
    norms: dict[tuple[str, str, str], np.ndarray]    # (layer, site, pool) -> float32 [N]
    within: dict[Target, np.ndarray]                 # (layer, site) -> float32 [N]
    timings: dict[str, float] = field(default_factory=dict)



def within_segment(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    r"""Within-segment token dispersion (Eq. 1 over one segment's token states), per segment.

    .. math::  D_b = 1 - \frac{\|s_b\|^2 - n_b}{n_b (n_b - 1)}, \quad
               s_b = \sum_{t:\,keep_{bt}} h_{bt} / \|h_{bt}\|

    Two reads of the states and no temporary of their size: the norms, then one batched
    matrix-vector product with the weights :math:`keep_{bt} / \|h_{bt}\|`; the final sums in
    float64. Segments with fewer than 2 kept states get NaN.

    Args:
        h: [B, T, d] float states.
        keep: [B, T] bool, the positions that count.

    Returns:
        [B] float64.
    """
    w = keep.to(h.dtype) / h.norm(dim=-1).clamp(min=1e-12)   # [B, T]
    s = torch.bmm(w.unsqueeze(1), h).squeeze(1).double()     # [B, d] sum of unit states
    n = keep.sum(1)                                            # [B]
    nf = n.double()
    within = 1.0 - ((s * s).sum(-1) - nf) / (nf * (nf - 1)).clamp(min=1)
    return torch.where(n >= 2, within, torch.full_like(within, float("nan")))

class Extractor:
    """Holds a model and extracts features for batches of token-id sequences.

    ``bos_token_id`` is required with ``prepend_bos``; callers pick it with
    :func:`dispersion.measure.capture.resolve_bos` (the tokenizer's BOS, else its EOS).
    """

    def __init__(self, model: nn.Module, *, layers: Sequence[int | str] = ("final",),
                 sites: Sequence[str] = ("block",), pools: Sequence[str] = ("last", "mean"),
                 prepend_bos: bool = True, bos_token_id: int | None = None, skip_first: int = 0,
                 context_lengths: Sequence[int] = (), batch_size: int = 16,
                 nll_chunk_tokens: int = 2048, pad_token_id: int = 0, fused_head: bool = False,
                 compile_blocks: bool = False):
        from dispersion.measure.modeling import num_layers, text_config

        self.model = model
        self.device = next(model.parameters()).device
        self.n_layers = num_layers(model.config)
        self.layers = layer_names(layers, self.n_layers)
        self.targets = targets(self.layers, sites)
        self.pools = [p for p in pools if p != "context"]
        self.context_pools = "context" in pools
        self.prepend_bos = prepend_bos
        self.bos_token_id = resolve_bos(bos_token_id, "extraction.prepend_bos") if prepend_bos else bos_token_id
        self.skip_first = skip_first
        self.context_lengths = list(context_lengths)
        self.batch_size = batch_size
        self.nll_chunk_tokens = nll_chunk_tokens
        self.pad_token_id = pad_token_id
        self.base: nn.Module = model.base_model  # type: ignore[assignment]  # torch types Module.__getattr__
        self.lm_head = model.get_output_embeddings()  # type: ignore[operator]  # torch types Module.__getattr__
        self.softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
        self.head = Head(self.lm_head, chunk=nll_chunk_tokens, softcap=self.softcap, fused=fused_head)
        self._capture = Capture(model, self.targets, self._reduce)  # runs to the end: NLL needs `final`
        self._state: dict = {}
        # extraction.compile: the blocks' sub-layers compiled; the compile happens in the first
        # batch, so its seconds are estimated as the first batch's time minus the second's
        self.compiled = CompiledBlocks(find_blocks(self.base, self.n_layers)) if compile_blocks else None
        self.compile_note: str | None = None
        self._first_batches: list[float] | None = [] if compile_blocks else None

    # -- reducer -------------------------------------------------------------------------
    def _reduce(self, target: Target, hidden: torch.Tensor) -> None:
        """Pool one target's [B, T, d] states into the current batch's accumulators (a
        :class:`dispersion.measure.capture.Capture` reducer)."""
        st = self._state
        h = hidden.float()                     # [B, T, d]; a copy only for half-precision states
        keep = st["keep"]                      # [B, T] bool
        out = st["out"]
        if "last" in self.pools:
            out[(*target, "last")] = h[st["rows"], st["last"]]
        if "mean" in self.pools:
            n = keep.sum(1).clamp(min=1).unsqueeze(-1).to(h.dtype)   # [B, 1] kept tokens
            # [B, 1, T] @ [B, T, d] -> [B, d]: the sum of kept states, then their mean
            out[(*target, "mean")] = torch.bmm(keep.to(h.dtype).unsqueeze(1), h).squeeze(1) / n
        if self.context_pools:
            for c in self.context_lengths:
                out[(*target, f"c{c}")] = h[:, st["off"] + c - 1]
        out[(*target, "within")] = within_segment(h, keep)

    # -- NLL -----------------------------------------------------------------------------
    def _token_nll(self, hidden: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """NLL of token t+1 from state t, for positions where ``scored`` [B, T-1] is true."""
        rows, cols = scored.nonzero(as_tuple=True)                 # (N,), (N,): the scored positions
        nll = self.head.nll(hidden[rows, cols], input_ids[rows, cols + 1])  # (N, d), (N,) -> (N,)
        full = torch.full(scored.shape, float("nan"), dtype=torch.float32, device=hidden.device)
        full[rows, cols] = nll
        return full

    # -- main ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _batch(self, seqs: Sequence[np.ndarray]) -> dict:
        off = 1 if self.prepend_bos else 0
        lengths = torch.tensor([len(s) for s in seqs])
        T = int(lengths.max()) + off
        B = len(seqs)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(seqs):
            if off:
                assert self.bos_token_id is not None  # resolved in __init__ when prepend_bos
                ids[i, 0] = self.bos_token_id
            ids[i, off:off + len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, :off + len(s)] = 1
        if self.context_pools and self.context_lengths and int(lengths.min()) < max(self.context_lengths):
            raise ModelError(f"extraction.context_lengths: {max(self.context_lengths)} is longer than a "
                             f"segment ({int(lengths.min())} tokens)")
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = torch.arange(T, device=self.device).unsqueeze(0)      # [1, T]
        total = (lengths + off).to(self.device).unsqueeze(1)        # [B, 1] tokens fed per row
        keep = (pos >= off + self.skip_first) & (pos < total)
        self._state = {"keep": keep, "off": off, "rows": torch.arange(B, device=self.device),
                       "last": (total.squeeze(1) - 1), "out": {}}
        hidden = self._capture.forward(input_ids=ids, attention_mask=mask)  # [B, T, d]; reduces `final`
        assert hidden is not None  # the capture has no stop_early: the pass runs to the end
        # state at position p predicts token p+1; score targets inside the segment
        scored = pos[:, :-1] + 1 < total
        nll = self._token_nll(hidden, ids, scored)  # [B, T-1]; column p scores token p+1
        if off:
            seg_nll, seg_scored = nll[:, off - 1:], scored[:, off - 1:]
        else:
            pad = torch.zeros((B, 1), dtype=torch.bool, device=nll.device)
            seg_nll = torch.cat([torch.full((B, 1), float("nan"), device=nll.device), nll], 1)
            seg_scored = torch.cat([pad, scored], 1)
        # seg_nll[:, j] = NLL of segment token j (0-based); NaN where not scored
        res = {
            "nll_sum": torch.where(seg_scored, seg_nll, 0).double().sum(1),
            "n_scored": seg_scored.sum(1),
            "last_token_nll": seg_nll[torch.arange(B), lengths.to(self.device) - 1],
        }
        for c in self.context_lengths:
            col = seg_nll[:, c - 1] if c - 1 < seg_nll.shape[1] else torch.full((B,), float("nan"), device=nll.device)
            res[f"last_nll_c{c}"] = torch.where(lengths.to(self.device) >= c, col, float("nan"))
            if self.context_pools:
                nxt = seg_nll[:, c] if c < seg_nll.shape[1] else torch.full((B,), float("nan"), device=nll.device)
                res[f"next_nll_c{c}"] = torch.where(lengths.to(self.device) > c, nxt, float("nan"))
        res["out"] = self._state["out"]
        return res

    def extract(self, token_ids: Sequence[np.ndarray], progress=None) -> Extracted:
        """Extract features for every sequence; batches are sorted by length (longest first)."""
        n = len(token_ids)
        if n == 0:
            raise ModelError("extract: no segments")
        order = sorted(range(n), key=lambda i: -len(token_ids[i]))
        feats: dict[str, np.ndarray] = {}
        vecs: dict = {}
        within: dict = {}
        t0 = time.perf_counter()
        try:
            with self._capture:  # hooks on for the whole call
                for s in range(0, n, self.batch_size):
                    idx = order[s:s + self.batch_size]
                    res = self._compiled_batch([token_ids[i] for i in idx])
                    out = res.pop("out")
                    for k, v in res.items():
                        dtype = np.float64 if k == "nll_sum" else np.float32
                        feats.setdefault(k, np.empty(n, dtype))[idx] = v.cpu().numpy()
                    for (layer, site, kind), v in out.items():
                        v = v.cpu().numpy()
                        if kind == "within":
                            within.setdefault((layer, site), np.empty(n, np.float32))[idx] = v
                        else:
                            vecs.setdefault((layer, site, kind), np.empty((n, v.shape[1]), np.float32))[idx] = v
                    if progress is not None:
                        progress(len(idx))
                    follow_share()  # side-by-side processes come and go: take the current share
        finally:
            self._state = {}
        feats["n_scored"] = feats["n_scored"].astype(np.int32)
        if (feats["n_scored"] < 1).any():
            raise ModelError("extract: a segment has no scored token (length 1 without prepend_bos)")
        feats["ppl"] = np.exp(feats["nll_sum"] / feats["n_scored"]).astype(np.float64)
        feats["last_token_ppl"] = np.exp(feats["last_token_nll"].astype(np.float64))
        _check_finite(feats, vecs)
        vectors = {k: v.astype(np.float16) for k, v in vecs.items()}
        norms = {k: np.linalg.norm(v, axis=1).astype(np.float32) for k, v in vecs.items()}
        timings = {"forward_s": time.perf_counter() - t0}
        compile_s = [c for c in (self.head.compile_s, self._blocks_compile_s()) if c is not None]
        if compile_s:
            timings["compile_s"] = sum(compile_s)  # the head's and the blocks' compile, inside forward_s
            self.head.compile_s = None  # reported once
        return Extracted(feats, vectors, norms, within, timings)

    def _compiled_batch(self, seqs: Sequence[np.ndarray]) -> dict:
        """One batch; with compiled blocks, timed while the compile is estimated, and run again
        eagerly if the compiler fails (the eager forwards restored, one warning line)."""
        if self.compiled is None:
            return self._batch(seqs)
        t = time.perf_counter()
        try:
            res = self._batch(seqs)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - the compiler fails in many ways; eager is always right
            self.compile_note = self.compiled.undo(err)
            self.compiled = self._first_batches = None
            return self._batch(seqs)
        if self._first_batches is not None and len(self._first_batches) < 2:
            self._first_batches.append(time.perf_counter() - t)
        return res

    def _blocks_compile_s(self) -> float | None:
        """The blocks' compile seconds, once: first batch minus second (the first alone when the
        first extraction had one batch)."""
        first = self._first_batches
        if not first:
            return None
        self._first_batches = None  # reported once
        return max(0.0, first[0] - first[1]) if len(first) == 2 else first[0]


def _check_finite(feats: dict[str, np.ndarray], vecs: dict) -> None:
    for k in ("nll_sum", "ppl", "last_token_nll"):
        bad = ~np.isfinite(feats[k])
        if bad.any():
            raise NonFiniteError(f"extract: {k} is not finite for {int(bad.sum())} segment(s) "
                                 f"(first row {int(np.argmax(bad))})")
    for key, v in vecs.items():
        bad = ~np.isfinite(v).all(1)
        if bad.any():
            raise NonFiniteError(f"extract: hidden state {'/'.join(key)} is not finite for {int(bad.sum())} segment(s)")
        if np.abs(v).max() > 65504:
            raise NonFiniteError(f"extract: hidden state {'/'.join(key)} overflows float16 storage")
