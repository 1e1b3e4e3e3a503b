"""Progress of a long step, written for where it is read.

On a terminal: a tqdm bar. Anywhere else (a pipe, a log file, a Prefect or Ray worker log):
plain lines, no carriage returns, no colours, one every ``every_s`` seconds and at the end::

    extract: 1200/4000 segments (30%), 41.2/s, ETA 1m08s [gpt2-tiny@step100]

``Progress(total, "extract", unit="segments", log=print)`` is used like a bar: ``update(n)``,
``note(text)`` for the bracketed detail, ``close()`` (or a ``with`` block). With ``work`` (the
total expected work, e.g. FLOPs) and ``update(n, work=w)``, the ETA is the remaining work at the
rate work has been done so far: rows of a model a hundred times cheaper count a hundredth.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


def interactive(stream=None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal that redraws a bar; ``TERM=dumb`` and
    ``DISPERSION_PLAIN_LOGS=1`` are not."""
    stream = stream or sys.stderr
    if os.environ.get("DISPERSION_PLAIN_LOGS") == "1" or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h01m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A progress reporter: a bar on a terminal, timed plain lines elsewhere, nothing when
    ``enabled`` is false."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", log: Callable[[str], None] = print,
                 enabled: bool = True, every_s: float = 30.0, bar: bool | None = None, initial: int = 0,
                 clock: Callable[[], float] = time.monotonic, work: float | None = None):
        self.total, self.desc, self.unit, self.log = int(total), desc, unit, log
        self.enabled, self.every_s, self.clock = enabled, every_s, clock
        self.n = self.initial = int(initial)
        # the ETA follows work (e.g. FLOPs) when given: rows of a cheap model count for less
        self.work_total = float(work) if work is not None else None
        self.work_done = 0.0
        self.detail = ""
        self.t0 = self.last = clock()
        self._bar = None
        if enabled and (interactive() if bar is None else bar):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit[:3] or "it")

    def line(self) -> str:
        """The plain progress line for the current count."""
        elapsed = self.clock() - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.n < self.total:
            if self.work_total is not None and self.work_done > 0 and elapsed > 0:
                eta = f", ETA {duration((self.work_total - self.work_done) / (self.work_done / elapsed))}"
            elif rate > 0:
                eta = f", ETA {duration((self.total - self.n) / rate)}"
        done = f", {duration(elapsed)}" if self.n >= self.total else ""
        extra = f" [{self.detail}]" if self.detail else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.1f}/s{eta}{done}{extra}"

    def update(self, n: int = 1, work: float | None = None) -> None:
        """``n`` more rows done, carrying ``work`` (default: ``n``) of the total work."""
        self.n += int(n)
        self.work_done += float(n if work is None else work)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.clock() - self.last >= self.every_s and self.n < self.total:
            self.last = self.clock()
            self.log(self.line())

    def note(self, detail: str) -> None:
        """What is being worked on (shown in brackets, e.g. the model@revision)."""
        self.detail = detail
        if self._bar is not None:
            self._bar.set_postfix_str(detail)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n:
            self.log(self.line())
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
