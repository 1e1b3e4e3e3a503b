r"""The decoder blocks' sub-layers through ``torch.compile`` (``extraction.compile``).

Every direct child of every decoder block (its norms, attention and MLP) gets its ``forward``
replaced by ``torch.compile(child.forward)``; the blocks themselves, the embeddings, the final
norm and the head stay eager. The compiler fuses what the eager forward runs as separate
kernels (a norm's square, mean, rsqrt and scale; the MLP's activation and gate product; the
rotary embedding), while every module's ``__call__``, and so every hook of
:class:`dispersion.measure.capture.Capture`, still runs eagerly: the captured states are the
same tensors at the same sites, equal to the eager ones up to float rounding of the fused
arithmetic (the spec key leaves the setting out).

The compile costs seconds once per process and model class (dynamo compiles a forward's code
once and reuses it for every block of that class; a second input shape, such as a shard's
last, shorter batch, compiles once more with a dynamic size). What it saves is a fraction of
the forward's time, which pays only for models whose blocks are large enough for the fused
element-wise work to matter, over enough tokens, on a device where the fused kernels beat the
eager ones: ``auto`` compiles a model on CUDA when a scan's forward FLOPs for it reach
:data:`BREAK_EVEN_FLOPS` and keeps the CPU eager (on the CPU the compiled blocks measured no
faster: bench/bench_compile.py), ``on`` always, ``off`` never. A compile that
fails (no C++ compiler, an unsupported device) restores the eager forwards and says why in one
warning line.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import nn

Compile = Literal["auto", "on", "off"]

BREAK_EVEN_FLOPS = 1e13  # forward FLOPs of a scan per model below which `auto` stays eager


def compile_failed(setting: str, err: BaseException, fallback: str) -> str:
    """The one warning line of a failed compile (printed to stderr and returned): the setting,
    the error's type and first line, and what runs instead."""
    first = str(err).splitlines()[0][:120] if str(err) else ""
    note = f"{setting}: compile failed ({type(err).__name__}: {first}); {fallback}"
    print(f"warning: {note}", file=sys.stderr)
    return note


def use_compile(setting: Compile, device: str, flops: float) -> tuple[bool, str | None]:
    """Whether a model's blocks run compiled on ``device`` for a scan of ``flops`` forward FLOPs,
    and the one line to log (the same for every model, so a scan logs it once) when ``auto``
    declines: ``auto`` compiles on CUDA at :data:`BREAK_EVEN_FLOPS` and above, and never on the
    CPU, where the compiled blocks measured no faster than the eager ones
    (bench/bench_compile.py); ``on`` always; ``off`` never."""
    if setting == "off":
        return False, None
    if setting == "on":
        return True, None
    if not device.startswith("cuda"):
        return False, None
    if flops < BREAK_EVEN_FLOPS:
        why = (f"extraction.compile: models below the compile's break-even (~{BREAK_EVEN_FLOPS:.0e} forward "
               f"FLOPs a scan) run eager blocks") if flops > 0 else None
        return False, why
    return True, None


class CompiledBlocks:
    """The sub-layers of ``blocks`` (an ``nn.ModuleList`` of decoder blocks) compiled in place (a
    sub-layer an earlier extractor compiled is left as it is); :meth:`undo` puts the eager
    forwards back (after a failed compile)."""

    def __init__(self, blocks: nn.ModuleList):
        self.children: list[nn.Module] = [child for block in blocks for child in block.children()
                                          if "forward" not in vars(child)]  # not compiled already
        for child in self.children:
            child.forward = torch.compile(child.forward)  # type: ignore[method-assign]

    def undo(self, err: BaseException) -> str:
        """Restore the eager forwards; returns the warning line (also printed to stderr)."""
        for child in self.children:
            if "forward" in vars(child):
                del child.forward  # the class's eager forward again
        return compile_failed("extraction.compile", err, "eager blocks")
