r"""Row-block streaming over an (N, d) embedding matrix: the O(N d) sums behind the cosine metrics.

Every cosine metric of paper 001 that is O(N d) (Eq. 1, the distance of each row to the rest,
the mean distance between two sets, the cosine terms of the dispersion gap) needs only

* the row norms :math:`\|x_i\|` (a sum over d per row), and
* the sum of unit rows :math:`s = \sum_i x_i / \|x_i\|` (a sum over N per column),
  or the dots :math:`u_i \cdot v` of every unit row with one vector.

:class:`Rows` computes them in one pass over row blocks of about :data:`BLOCK_BYTES` (a block is
read from memory once; its norms and its weighted row sum then read it from cache). Products
are in the input's precision (float16 and bfloat16 are widened to float32 one block at a time);
sums over rows run in float32 over at most :data:`PARTIAL_ROWS` rows and in float64 beyond, so
the rounding does not grow with N. No full-size copy of the input is made: numpy arrays and CPU
tensors are read in place, tensors on an accelerator are summed there. The kernels are torch's,
so they use torch's intra-op threads (:func:`dispersion.core.threads.set_torch_threads`).

``precision="float64"`` widens each block to float64 instead (still block by block): the metrics
use it to refine a result whose float32 rounding is no longer small next to the result itself
(near-parallel rows, :data:`REFINE_BELOW`).

Validation happens on the way (no separate pass): the first row holding a non-finite value is
named; zero rows are collected and named; a row whose squared norm over- or underflows float32
is recomputed in float64 with scaling, so huge or tiny (but finite, non-zero) rows are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["BLOCK_BYTES", "PARTIAL_ROWS", "REFINE_BELOW", "SMALL", "Precision", "Rows", "as_numpy"]

BLOCK_BYTES = 8 * 2**20
"""About this many bytes per block (2560 float32 rows at d = 768, in multiples of PARTIAL_ROWS)."""

PARTIAL_ROWS = 32
"""Rows summed in float32 before the partial sum joins the float64 total."""

SMALL = 2**18
"""Matrices of at most this many elements are read in float64 throughout (it costs microseconds,
and with few rows the float32 rounding of each row's norm does not average out)."""

REFINE_BELOW = 0.05
"""A cosine metric computed from float32 blocks is recomputed from float64 blocks when its value
is below this: its float32 error stays under about 3e-8 absolute, so above it the relative error
is under 1e-6 (tests/test_metrics.py checks both regimes against the float64 naive)."""

Precision = Literal["input", "float64"]

_SAFE = {torch.float32: (1e-15, 1e18), torch.float64: (1e-150, 1e150)}
"""Row norms inside these bounds have squares and reciprocals that B's dtype holds exactly enough."""


def as_numpy(x: Any) -> np.ndarray:
    """Convert numpy arrays, sequences or torch tensors to a numpy array (no copy if possible);
    half-precision torch tensors become float64."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_floating_point() or t.is_complex():
            t = t.double()  # also handles bfloat16 / float16, which numpy cannot take
        return t.numpy()
    return np.asarray(x)


class Rows:
    """A validated (N, d) matrix read block by block, without copying it.

    Accepts numpy arrays (any real dtype), nested sequences and torch tensors (any device, any
    real dtype).

    Args:
        X: the (N, d) matrix.
        name: its name in error messages.
        min_rows: the fewest rows accepted.
        index: read only these rows of X, in this order (gathered a block at a time, so a
            subset is never copied whole); N is then ``len(index)``.
        row_label: names row i (of the subset) in errors, e.g. ``"E row 4 (in domain_ids)"``;
            default: "row i of X".
    """

    def __init__(self, X: Any, name: str = "X", min_rows: int = 2, index: np.ndarray | None = None,
                 row_label: Callable[[int], str] | None = None) -> None:
        self.name = name
        self.row_label = row_label
        if isinstance(X, torch.Tensor):
            T = X.detach()
            if T.is_complex():
                raise ValueError(f"{name} must be a real numeric array, got dtype {T.dtype}")
        else:
            A = np.asarray(X)
            if not (np.issubdtype(A.dtype, np.number) or A.dtype == np.bool_) or np.iscomplexobj(A):
                raise ValueError(f"{name} must be a real numeric array, got dtype {A.dtype}")
            if A.dtype not in (np.float16, np.float32, np.float64):
                A = A.astype(np.float64)  # integers, booleans, long double: exact in float64
            T = torch.from_numpy(A if all(st >= 0 for st in A.strides) else A.copy())  # torch takes no negative strides
        if T.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got ndim={T.dim()} with shape {tuple(T.shape)}")
        self._index = None if index is None else torch.as_tensor(np.asarray(index, np.int64), device=T.device)
        n = T.shape[0] if self._index is None else len(self._index)
        if n < min_rows:
            raise ValueError(f"{name} needs N >= {min_rows} rows, got N={n}")
        if T.shape[1] < 1:
            raise ValueError(f"{name} needs at least one column, got shape {tuple(T.shape)}")
        if not T.is_floating_point():
            T = T.double()
        self._T = T
        self.n, self.d = int(n), int(T.shape[1])
        self.lossy = T.dtype != torch.float64 and self.n * self.d > SMALL  # "input" rounds to float32

    @property
    def device(self) -> torch.device:
        """Where the blocks live (the input tensor's device; CPU for numpy input)."""
        return self._T.device

    # ------------------------------------------------------------------ blocks
    def blocks(self, precision: Precision = "input") -> Iterator[tuple[int, torch.Tensor]]:
        """``(row, block)`` for consecutive row blocks; ``block`` is a float32 or float64
        ``[b, d]`` tensor on the input's device: a view of the input where its dtype allows,
        else a reused buffer (valid until the next block)."""
        dtype = torch.float32 if (precision == "input" and self.lossy) else torch.float64
        rows = max(PARTIAL_ROWS, BLOCK_BYTES // (dtype.itemsize * self.d) // PARTIAL_ROWS * PARTIAL_ROWS)
        buf = None  # one conversion buffer, reused: widened blocks never pile up
        for a in range(0, self.n, rows):
            B = self._T[a:a + rows] if self._index is None else self._T[self._index[a:a + rows]]
            if B.dtype != dtype:
                if buf is None:
                    buf = torch.empty((rows, self.d), dtype=dtype, device=B.device)
                B = buf[: len(B)].copy_(B)
            yield a, B

    def norms(self, a: int, B: torch.Tensor, zeros: list[int] | None = None) -> torch.Tensor:
        """Row norms of block ``B`` (rows ``a..`` of the matrix) as float64 ``[b]``; raises on
        the first non-finite row. With ``zeros`` (cosine), zero rows are appended to it and
        their norm returned as inf, so they weigh nothing; without, their norm is 0."""
        r = torch.linalg.vector_norm(B, dim=1).double()  # [b], sum over d in B's precision
        bad = ~((r > 0) & torch.isfinite(r))
        if bool(bad.any()):
            r = r.clone()
            for i in bad.nonzero().flatten().tolist():
                row = B[i].double()
                if not bool(torch.isfinite(row).all()):
                    if self.row_label is not None:
                        raise ValueError(f"{self.row_label(a + i)} contains non-finite values")
                    raise ValueError(f"{self.name} contains non-finite values (first in row {a + i})")
                m = row.abs().max()
                if m == 0:
                    if zeros is not None:
                        zeros.append(a + i)
                    r[i] = float("inf") if zeros is not None else 0.0
                else:  # over- or underflow of B's precision: scale, then the norm in float64
                    r[i] = m * torch.linalg.vector_norm(row / m)
        return r

    def raise_zeros(self, zeros: list[int]) -> None:
        """Raise the one-line error for the zero rows collected by :meth:`norms`, if any."""
        if zeros and self.row_label is not None:
            raise ValueError(f"{self.row_label(zeros[0])} is a zero vector; cosine distance is undefined")
        if zeros:
            raise ValueError(
                f"row {zeros[0]} of {self.name} is a zero vector; cosine distance is undefined"
                + (f" ({len(zeros)} zero rows in total)" if len(zeros) > 1 else "")
            )

    def _unit_sum_block(self, a: int, B: torch.Tensor, zeros: list[int]) -> torch.Tensor:
        """``sum_i B_i / ||B_i||`` over block ``B`` (rows ``a..``) as float64 ``[d]``: products in
        B's precision, float32 sums over :data:`PARTIAL_ROWS` rows at most. A block with a row
        whose norm is not safely inside B's range (zero, non-finite, squares that over- or
        underflow) is redone in float64 from :meth:`norms`, which names bad rows."""
        r = torch.linalg.vector_norm(B, dim=1)                  # [b], sum over d in B's precision
        lo, hi = (float(v) for v in torch.aminmax(r))           # NaN fails both tests below
        safe_lo, safe_hi = _SAFE[B.dtype]
        if not (lo > safe_lo and hi < safe_hi):
            return (1.0 / self.norms(a, B, zeros)) @ B.double()  # zero rows weigh 0
        w = (1.0 / r.double()).to(B.dtype)                      # [b], one rounding
        b, full = len(B), len(B) // PARTIAL_ROWS * PARTIAL_ROWS
        out = torch.zeros(B.shape[1], dtype=torch.float64, device=B.device)
        if full:  # [k, 1, PARTIAL_ROWS] @ [k, PARTIAL_ROWS, d] -> k partial sums [k, 1, d]
            k = full // PARTIAL_ROWS
            part = torch.bmm(w[:full].reshape(k, 1, PARTIAL_ROWS), B[:full].reshape(k, PARTIAL_ROWS, -1))
            out += part.reshape(k, -1).double().sum(0)
        if full < b:
            out += (w[full:] @ B[full:]).double()
        return out

    # ------------------------------------------------------------------ sums
    def unit_sum(self, precision: Precision = "input") -> np.ndarray:
        r""":math:`s = \sum_i x_i / \|x_i\|` as float64 ``[d]`` (raises on zero or non-finite rows)."""
        s = torch.zeros(self.d, dtype=torch.float64, device=self.device)
        zeros: list[int] = []
        for a, B in self.blocks(precision):
            s += self._unit_sum_block(a, B, zeros)  # [d]
        self.raise_zeros(zeros)
        return s.cpu().numpy()

    def unit_dots(self, v: np.ndarray) -> np.ndarray:
        r""":math:`u_i \cdot v` for every row, float64 ``[N]`` (raises on zero or non-finite rows).
        Taken from float64 blocks: :math:`1 - u_i \cdot s / (N-1)` cancels when rows agree, and a
        float32 dot over d terms would leave ~1e-6 of it."""
        out = torch.empty(self.n, dtype=torch.float64, device=self.device)
        vt = torch.as_tensor(v, dtype=torch.float64, device=self.device)
        zeros: list[int] = []
        for a, B in self.blocks("float64"):
            out[a:a + len(B)] = torch.mv(B, vt) / self.norms(a, B, zeros)  # [b]
        self.raise_zeros(zeros)
        return out.cpu().numpy()
