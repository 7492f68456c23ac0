"""Large CPU outputs backed by transparent huge pages, where Linux offers them.

A fresh tensor of tens of MiB is page-faulted in 4 KiB at a time on first
write. On the virtual machines this project measures on, that costs ~2 us a
page: writing a new 32 MiB output takes ~22 ms against ~4 ms for the same
write into memory already mapped, which is as much as all the arithmetic of a
linear-attention forward (docs/benchmarks.rst has the measurements). Asking
the kernel for 2 MiB pages (``madvise(MADV_HUGEPAGE)``, the same thing
PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` does for every allocation) cuts
the number of faults by an order of magnitude.

:func:`empty` does this for one tensor: it advises the 2 MiB-aligned part of
a fresh ``torch.empty`` (the tensor itself is an ordinary one, offset 0). The
unaligned head and tail still fault in small pages: ~530 faults instead of
8192 for a 32 MiB output, 22 -> ~8 ms here. Anywhere it cannot (another OS, a
device, a small tensor, ``KERNELATTN_TORCH_HUGEPAGES=0``) it is ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys

import torch

ENV = "KERNELATTN_TORCH_HUGEPAGES"
MIN_BYTES = 4 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no") and bool(_libc_madvise())


def empty(shape, *, dtype, device):
    """An uninitialised contiguous tensor; on a Linux CPU and past 4 MiB, in huge pages."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or torch.compiler.is_compiling() or not enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype)
    addr = out.data_ptr()
    start = -(-addr // _HUGE) * _HUGE
    length = ((addr + nbytes - start) // _HUGE) * _HUGE
    if length > 0:
        _madvise(start, length, _MADV_HUGEPAGE)
    return out
