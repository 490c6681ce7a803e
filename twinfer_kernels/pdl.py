"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start
while the kernel before it finishes, so its start-up overlaps that kernel's tail. Each kernel in
such a chain waits (``gdc_wait``) before touching what an earlier kernel writes, and lets the next
one launch (``gdc_launch_dependents``) once its own dependent-free work is issued (dense_gemv.py
says where the GEMVs put both)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def launch_options(pdl: bool) -> dict:
    """The launch keywords for a PDL launch when ``pdl``, none otherwise."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """The start of a small kernel in a PDL chain: wait for the kernel before, then let the
    next one launch at once, so that its weight loads overlap this kernel."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
