r"""One model's measurement of queries (paper 001 Sec. 3.1, B.1): the pooled hidden states of
each query's text, its within-query token dispersion and its perplexity (:func:`measure_texts`),
and, for the embedded cloze, the model's own answer by lm-eval's ``acc`` rule, the choice with
the highest summed log-likelihood

.. math:: \hat c = \arg\max_c \sum_{k=1}^{K} \log p(y^{(c)}_k \mid x_{1..T}, y^{(c)}_{<k})

(:func:`answer_cloze`: one forward pass per context, its KV cache repeated once per choice).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dispersion.core.errors import ConfigError, DataError, NonFiniteError
from dispersion.measure.capture import Capture, Target, layer_names, targets
from dispersion.measure.cloze import Cloze, encode_texts


# --------------------------------------------------------------------------- #
# measurement
# --------------------------------------------------------------------------- #
@dataclass
class Measured:
    """Per-query results, in query order (N queries).

    ``n_scored``, ``nll_sum``, ``ppl``: (N,) the query text's scored tokens, summed NLL and
    perplexity; ``vectors``: (layer, site, pool) -> (N, d) float32 pooled states;
    ``within``: (layer, site) -> (N,) within-query token dispersion (NaN below 2 tokens).
    """

    n_tokens: np.ndarray
    n_scored: np.ndarray
    nll_sum: np.ndarray
    ppl: np.ndarray
    vectors: dict[tuple[str, str, str], np.ndarray]
    within: dict[Target, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ClozeAnswers(Measured):
    """:class:`Measured` plus the answers: ``loglik`` (N, C) summed continuation
    log-likelihoods, ``chosen`` (N,) argmax (first of ties), ``correct`` (N,) bool."""

    loglik: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    chosen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def _token_logprob(lm_head, softcap: float | None, hidden, ids):
    """log p(ids[i] | state hidden[i]) for rows of ``hidden`` [M, d], ``ids`` [M]
    (:class:`dispersion.measure.head.Head`)."""
    from dispersion.measure.head import Head

    return -Head(lm_head, softcap=softcap).nll(hidden, ids)


def _cache_argument(base) -> str:
    """The keyword a base model's forward takes its KV cache by (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def answer_cloze(model, cloze: Cloze, *, layers: Sequence[int | str] = ("final",),
                 sites: Sequence[str] = ("block",), pools: Sequence[str] = ("last",),
                 prepend_bos: bool = True, bos_token_id: int | None = None,
                 batch_size: int = 16) -> ClozeAnswers:
    """Answer the cloze and measure its contexts, one forward pass per batch of contexts.

    Per batch of B contexts ``[BOS] x_1..x_T``:

    1. one pass of the base model under :class:`dispersion.measure.capture.Capture` with
       its KV cache: the states of the requested targets pooled over the T context positions
       (``last`` = at x_T, ``mean`` = over x_1..x_T; the BOS position is not pooled), their
       within-context token dispersion, the NLL of the context (x_1..x_T after a BOS, else
       x_2..x_T), and log p(y_1 | x) of every option's first token from the state at x_T;
    2. the cache repeated C times (``batch_repeat_interleave``) and the B x C options' tokens
       y_1..y_{K-1} fed once: log p(y_k | x, y_<k) for k = 2..K.

    The answer is the option with the highest sum (lm-eval's ``acc``; the first of ties).
    """
    import torch

    from dispersion.measure.capture import resolve_bos
    from dispersion.measure.modeling import max_positions, num_layers, text_config

    N, T = cloze.contexts.shape
    C, K = cloze.options.shape[1:]
    off = int(prepend_bos)
    if prepend_bos:
        bos_token_id = resolve_bos(model if bos_token_id is None else bos_token_id, "extraction.prepend_bos")
    limit = max_positions(model.config)
    if limit is not None and off + T + K > limit:
        raise ConfigError(f"hardness: cloze of {T} + {K} tokens{' + BOS' if off else ''} exceeds the model's "
                          f"context ({limit})")
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(cloze.contexts.max()) >= vocab or int(cloze.options.max()) >= vocab:
        raise DataError(f"hardness: token id out of range 0..{vocab - 1} (built with another tokenizer?)")
    tg = targets(layer_names(layers, num_layers(model.config)), sites)
    dev = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    vecs: dict[tuple[str, str, str], np.ndarray] = {}
    within: dict[Target, np.ndarray] = {}
    nll_sum = np.empty(N, np.float64)
    loglik = np.empty((N, C), np.float64)
    cur: dict[Any, Any] = {}

    def reduce(t: Target, hidden) -> None:  # [B, off + T, d] -> pooled [B, d] and within [B]
        h = hidden[:, off:].float()
        if "last" in pools:
            cur[(*t, "last")] = h[:, -1]
        if "mean" in pools:
            cur[(*t, "mean")] = h.mean(1)
        n = h.shape[1]
        unit = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        s = unit.sum(1).double()
        cur[t] = 1.0 - ((s ** 2).sum(-1) - n) / max(n * (n - 1), 1) if n >= 2 else \
            torch.full((h.shape[0],), float("nan"), dtype=torch.float64)

    t0 = time.perf_counter()
    with torch.inference_mode():
        for s0 in range(0, N, batch_size):
            ctx = torch.as_tensor(cloze.contexts[s0:s0 + batch_size], dtype=torch.long)  # [B, T]
            opts = torch.as_tensor(cloze.options[s0:s0 + batch_size], dtype=torch.long).to(dev)  # [B, C, K]
            B = ctx.shape[0]
            if off:
                # [B, 1 + T]: BOS first
                ctx = torch.cat([torch.full((B, 1), int(bos_token_id), dtype=torch.long), ctx], 1)  # type: ignore[arg-type]
            ctx = ctx.to(dev)
            cur.clear()
            with Capture(model, tg, reduce) as cap:
                hidden, cache = cap.forward_cached(input_ids=ctx, attention_mask=torch.ones_like(ctx))
            # context NLL: state p predicts token p + 1; [B, P-1, d] -> [B*(P-1), d], back to [B, P-1]
            lp_ctx = _token_logprob(lm_head, softcap, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                                    ctx[:, 1:].reshape(-1)).view(B, -1)
            nll_sum[s0:s0 + B] = (-lp_ctx.double().sum(1)).cpu().numpy()
            last = hidden[:, -1:].expand(B, C, hidden.shape[-1]).reshape(B * C, -1)  # [B*C, d]
            # first token of each choice, from the context's last state: [B*C] -> [B, C]
            ll = _token_logprob(lm_head, softcap, last, opts[:, :, 0].reshape(-1)).view(B, C).double()
            if K > 1:
                cache.batch_repeat_interleave(C)  # [B*C, heads, off + T, d_head]: row b*C + c = context b
                feed = opts[:, :, :-1].reshape(B * C, K - 1)  # [B, C, K-1] -> [B*C, K-1]
                mask = torch.ones((B * C, ctx.shape[1] + K - 1), dtype=torch.long, device=dev)
                out = model.base_model(input_ids=feed, attention_mask=mask, use_cache=True,
                                       **{_cache_argument(model.base_model): cache})
                h2 = out.last_hidden_state  # [B*C, K-1, d]
                # choice tokens 2..K: [B*C*(K-1), d] -> [B, C, K-1]
                lp = _token_logprob(lm_head, softcap, h2.reshape(-1, h2.shape[-1]),
                                    opts[:, :, 1:].reshape(-1)).view(B, C, K - 1)
                ll = ll + lp.double().sum(-1)
            del cache
            loglik[s0:s0 + B] = ll.cpu().numpy()
            for key, v in cur.items():
                if len(key) == 3:
                    vecs.setdefault(key, np.empty((N, v.shape[1]), np.float32))[s0:s0 + B] = v.cpu().numpy()
                else:
                    within.setdefault(key, np.empty(N, np.float32))[s0:s0 + B] = v.cpu().numpy()
    n_scored = np.full(N, T + off - 1, np.int32)
    ppl = np.exp(nll_sum / np.maximum(n_scored, 1))
    chosen = np.argmax(loglik, axis=1)
    res = ClozeAnswers(np.full(N, T, np.int32), n_scored, nll_sum, ppl, vecs, within,
                       {"forward_s": time.perf_counter() - t0}, loglik=loglik, chosen=chosen,
                       correct=chosen == cloze.answer)
    _check(res)
    return res



def measure_texts(model, tokenizer, texts: Sequence[str], *, layers: Sequence[int | str] = ("final",),
                  sites: Sequence[str] = ("block",), pools: Sequence[str] = ("last",), prepend_bos: bool = True,
                  max_tokens: int = 512, batch_size: int = 16) -> Measured:
    """Measure query texts with :class:`dispersion.measure.extract.Extractor` (one forward
    pass per batch): pooled states, within-query dispersion and perplexity of each text's
    tokens (no special tokens; a BOS before them with ``prepend_bos``). A text longer than
    ``max_tokens`` keeps its **last** ``max_tokens`` tokens: the end of a prompt, where the
    question is, and the state the last-token pool reads."""
    from dispersion.measure.capture import bos_or_eos, resolve_bos
    from dispersion.measure.extract import Extractor
    from dispersion.measure.modeling import max_positions

    limit = max_positions(model.config)
    keep = max_tokens if limit is None else min(max_tokens, limit - int(prepend_bos))
    ids = [np.asarray(t[-keep:], dtype=np.int64) for t in encode_texts(tokenizer, texts)]
    short = [i for i, t in enumerate(ids) if len(t) < (1 if prepend_bos else 2)]
    if short:
        raise DataError(f"hardness: query {short[0]} has {len(ids[short[0]])} tokens: too short to score")
    bos = resolve_bos(tokenizer, "extraction.prepend_bos") if prepend_bos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos_or_eos(tokenizer) or 0)
    ex = Extractor(model, layers=layers, sites=sites, pools=list(pools), prepend_bos=prepend_bos,
                   bos_token_id=bos, batch_size=batch_size, pad_token_id=pad)
    out = ex.extract(ids)
    f = out.features
    return Measured(np.asarray([len(t) for t in ids], np.int32), f["n_scored"], f["nll_sum"], f["ppl"],
                    {k: v.astype(np.float32) for k, v in out.vectors.items()}, out.within, out.timings)


def _check(m: Measured) -> None:
    bad = ~np.isfinite(m.ppl)
    if bad.any():
        raise NonFiniteError(f"hardness: perplexity is not finite for {int(bad.sum())} quer(ies)")
    for key, v in m.vectors.items():
        if not np.isfinite(v).all():
            raise NonFiniteError(f"hardness: hidden state {'/'.join(key)} is not finite")


# --------------------------------------------------------------------------- #
# stored measurements
# --------------------------------------------------------------------------- #
def vector_name(layer: str, site: str, pool: str) -> str:
    """Column of a stored query shard holding the (layer, site, pool) vectors."""
    return f"vec/{layer}/{site}/{pool}"


def within_name(layer: str, site: str) -> str:
    """Column of a stored query shard holding the within-query dispersion at (layer, site)."""
    return f"within/{layer}/{site}"
