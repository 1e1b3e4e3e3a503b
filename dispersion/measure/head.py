r"""The LM head and the per-token NLL, chunk by chunk (paper 001 Eq. 2's perplexity terms).

For scored states :math:`h_i` (rows of ``hidden``, ``(N, d)``) and next tokens :math:`y_i`:

.. math::
    \mathrm{NLL}_i = \log \sum_{v} \exp(z_{iv}) - z_{i y_i}, \qquad z_i = W h_i + b
    \quad (\text{logits soft-capped as } c \tanh(z / c) \text{ where the model does})

computed ``chunk`` rows at a time, so at most ``chunk x vocab`` logits exist at once. The
logits come out of the head in the model's dtype; the log-sum-exp runs in fp32.

Two paths compute the same numbers (to fp32 rounding of the sum's order):

* **eager**: one ``linear``, then the fp32 copy of the chunk's logits and ``logsumexp``;
* **fused** (``extraction.fused_head``): the same function through ``torch.compile``, which
  fuses the fp32 up-cast, the soft-cap, the max, the sum of exponentials and the gather into
  one pass over the head's output, so the head costs its matmul and little more. It pays for
  half-precision models, whose eager path writes and reads an fp32 copy of every logit; the
  compile takes seconds (more on a first run, before the compiler's cache is warm), so a scan
  below :data:`BREAK_EVEN_TOKENS` per model keeps the eager path. Every chunk is padded to one
  shape, so one compiled kernel serves the whole scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch

from dispersion.measure.compiled import compile_failed

FusedHead = Literal["auto", "on", "off"]

LOGIT_BUDGET = 2**26  # fp32 logits held at once (256 MiB): caps the chunk for large vocabularies
FUSED_CHUNK = 256  # rows per fused chunk: its logits stay in the CPU's cache
BREAK_EVEN_TOKENS = 200_000  # tokens per model below which `auto` keeps the eager head
HALF = ("bfloat16", "float16")


def use_fused(setting: FusedHead, dtype: str, tokens: int) -> tuple[bool, str | None]:
    """Whether a model's head runs fused, and the one line to log when ``auto`` declines for the
    scan's size: ``auto`` fuses half-precision heads over at least :data:`BREAK_EVEN_TOKENS`
    tokens; ``on`` always; ``off`` never."""
    if setting == "off" or (setting == "auto" and dtype not in HALF):
        return False, None
    if setting == "auto" and tokens < BREAK_EVEN_TOKENS:
        return False, (f"extraction.fused_head: {tokens} tokens per model are below the compile's break-even "
                       f"(~{BREAK_EVEN_TOKENS}): the eager head")
    return True, None


def chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              softcap: float | None) -> torch.Tensor:
    """NLL (fp32, ``(n,)``) of ``targets`` (``(n,)``) from states ``hidden`` (``(n, d)``)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # (n, vocab) fp32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None]).squeeze(1)


class Head:
    """The NLL of scored states through an LM head (``nn.Linear``), ``chunk`` rows at a time
    (at most :data:`LOGIT_BUDGET` logits; :data:`FUSED_CHUNK` rows when fused);
    ``fused``: through the compiled :func:`chunk_nll` (compiled at the first call; its seconds
    in :attr:`compile_s`). A failed compile (no C++ compiler, an unsupported device) falls back
    to the eager path and says why in :attr:`note`."""

    def __init__(self, lm_head: torch.nn.Module, *, chunk: int | None = None, softcap: float | None = None,
                 fused: bool = False):
        self.weight: torch.Tensor = lm_head.weight  # type: ignore[assignment]  # (vocab, d)
        self.bias: torch.Tensor | None = getattr(lm_head, "bias", None)
        budget = max(1, LOGIT_BUDGET // int(self.weight.shape[0]))
        self.chunk: int = max(1, min(chunk or budget, budget, FUSED_CHUNK if fused else budget))
        self.softcap = softcap
        self.fused = fused
        self.compile_s: float | None = None
        self.note: str | None = None
        self._kernel: Callable | None = None

    def _compiled(self) -> Callable | None:
        if self._kernel is None and self.fused:
            kernel = torch.compile(chunk_nll, dynamic=False)
            t0 = time.perf_counter()
            d = self.weight.shape[1]
            try:
                with torch.inference_mode():  # compiled as it is called: under inference mode
                    kernel(torch.zeros(self.chunk, d, dtype=self.weight.dtype, device=self.weight.device),
                           self.weight, self.bias,
                           torch.zeros(self.chunk, dtype=torch.long, device=self.weight.device), self.softcap)
            except Exception as err:  # noqa: BLE001 - the compiler fails in many ways; eager is always right
                self.fused = False
                self.note = compile_failed("extraction.fused_head", err, "the eager head")
                return None
            self.compile_s = time.perf_counter() - t0
            self._kernel = kernel
        return self._kernel

    @torch.inference_mode()
    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """fp32 ``(N,)`` NLL of ``targets`` ``(N,)`` from ``hidden`` ``(N, d)`` (a measurement:
        no gradient)."""
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kernel = self._compiled()
        for s in range(0, n, self.chunk):
            e = min(s + self.chunk, n)
            if kernel is None:
                out[s:e] = chunk_nll(hidden[s:e], self.weight, self.bias, targets[s:e], self.softcap)
                continue
            h, y = hidden[s:e], targets[s:e]
            if e - s < self.chunk:  # pad the last chunk to the compiled shape
                h = torch.cat([h, h.new_zeros(self.chunk - (e - s), h.shape[1])])
                y = torch.cat([y, y.new_zeros(self.chunk - (e - s))])
            out[s:e] = kernel(h, self.weight, self.bias, y, self.softcap)[:e - s]
        return out
