"""Progress outside a terminal: plain timed lines with N/M, rate and ETA; no carriage returns."""

from __future__ import annotations

from dispersion.core.progress import Progress, duration, interactive


def test_plain_lines_with_counts_rate_and_eta():
    lines: list[str] = []
    t = [0.0]
    p = Progress(100, "extract", unit="segments", log=lines.append, every_s=1.0, bar=False, clock=lambda: t[0])
    p.note("gpt2-tiny@step0")
    for _ in range(10):
        t[0] += 0.5
        p.update(10)
    p.close()
    assert lines[0] == "extract: 20/100 segments (20%), 20.0/s, ETA 4s [gpt2-tiny@step0]"
    assert lines[-1] == "extract: 100/100 segments (100%), 20.0/s, 5s [gpt2-tiny@step0]"
    assert len(lines) == 5 and not any("\r" in x for x in lines)


def test_disabled_progress_says_nothing_and_resumed_counts_start_from_initial():
    lines: list[str] = []
    p = Progress(10, "train", log=lines.append, enabled=False, bar=False)
    p.update(10)
    p.close()
    assert lines == []
    t = [0.0]
    p = Progress(10, "train", unit="steps", log=lines.append, bar=False, initial=6, clock=lambda: t[0])
    t[0] = 2.0
    p.update(4)
    p.close()
    assert lines == ["train: 10/10 steps (100%), 2.0/s, 2s"]


def test_not_interactive_in_a_pipe(monkeypatch):
    import io

    assert not interactive(io.StringIO())
    assert [duration(s) for s in (4.4, 65, 7322)] == ["4s", "1m05s", "2h02m"]
