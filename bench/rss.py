"""Peak resident memory of this process on Linux, for the benchmarks' memory columns.

``reset_peak_rss()`` resets the kernel's high-water mark (``/proc/self/clear_refs`` 5) and
returns the current RSS; ``peak_rss_kb()`` reads the mark (``VmHWM``) since then.
"""

from __future__ import annotations


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); returns the current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")
