"""The CPU allocator setting that training and inference share (train.cpu_keep_freed_memory, and
--cpu-keep-freed-memory of evaluate, predict and embed)."""

from __future__ import annotations


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (train.cpu_keep_freed_memory): no mmap for large
    blocks (an munmap'd block comes back as fresh pages, a page fault each), no trimming of the heap's top, and
    512 MiB of headroom per heap extension. What MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... do, set from here
    so that every launcher gets it; loader workers forked later inherit it. False where there is no glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # from glibc's malloc.h
    settings = ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 512 << 20))
    return all([mallopt(param, value) == 1 for param, value in settings])
