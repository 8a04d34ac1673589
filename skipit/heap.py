"""Keep a long pass's resident memory at what it uses: glibc's malloc and large, short-lived tensors.

glibc serves an allocation above its *mmap threshold* with a mapping of its own, returned to the system
when freed, and a smaller one from the heap, where freed memory stays resident and fragments. The
threshold starts at 128 KiB but rises (up to 32 MiB on 64-bit) each time a mapped block is freed, so from
the second batch on, a pass's activations, logit slices and log-softmax copies (1–32 MiB each) come from the
heap. Fixing it (``mallopt(M_MMAP_THRESHOLD)``, the same as glibc's ``MALLOC_MMAP_THRESHOLD_`` environment
variable) also switches the rise off. Measured on SmolLM2-135M (analysis pass, 40 / 160 / 640 samples, one
thread, ``benchmarks/scaling.py --only samples``): peak resident memory 1,345–1,418 MiB at 32 MiB (glibc's
steady state), 1,128–1,219 at 16, 1,197–1,221 at 8, 1,174–1,179 at 1; each mapped block costs page faults,
so the pass took 80 s at 32 MiB, 96 at 8 and 102 at 1 (640 samples). 8 MiB keeps the logit slices
(:data:`skipit.compressor.textlogp.CHUNK_BYTES`) and their copies mapped and the per-layer activations on the heap.

This is a process-wide setting, so only the command line applies it (:func:`skipit.cli.runner.run_job`);
a Python user can call :func:`cap_heap_growth` or set the environment variable. Elsewhere than glibc
(macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "cap_heap_growth"]

logger = logging.getLogger(__name__)

#: Allocations of at least this many bytes get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 8 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def cap_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it was set.

    Left alone (False) off glibc, or when the user chose a threshold with ``MALLOC_MMAP_THRESHOLD_``.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        done = False
    if not done:
        logger.debug("could not set glibc's mmap threshold; resident memory may grow with fragmentation")
    return done
