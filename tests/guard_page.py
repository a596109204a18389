"""Tensors placed just before a page that may not be touched: a kernel that reads or writes one element past
the end faults (the test process dies, which fails the run) instead of passing on whatever memory follows."""

import sys

import pytest
import torch


def before_guard_page(t):
    """A copy of the 1-D tensor t whose last byte is followed by a page that may not be read (POSIX only)."""
    mmap = pytest.importorskip("mmap")
    import ctypes

    import numpy as np

    if sys.platform != "linux":
        pytest.skip("needs mmap/mprotect (Linux)")
    prot_none = 0
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // page) + 1
    buf = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + (pages - 1) * page, page, prot_none) == 0, ctypes.get_errno()
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=(pages - 1) * page - nbytes)
    out = torch.from_numpy(raw).view(t.dtype)
    out.copy_(t)
    return out
