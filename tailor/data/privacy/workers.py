"""How a worker process of anonymize_batch is set up: one BLAS thread, and an allocator that keeps
freed memory."""

from __future__ import annotations


def _start_worker() -> None:
    """In a worker process: NER's matrix products on one thread (the workers already fill the
    cores, and BLAS threads on top of them only contend for them; docs/performance.md), and freed
    memory kept for the next batch (keep_freed_memory)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """glibc malloc: blocks under 32 MB from the heap, and the heap handed back to the kernel only
    past 128 MB free. By default it maps the NER's larger temporary arrays (a batch of 256 texts
    makes some of tens of MB) one by one and trims the heap once twice the largest is free, so
    every batch faults its memory in again from zeroed pages, which slows NER down markedly
    (docs/performance.md). A no-op where the C library is not glibc. It changes the whole
    process's allocator, so the library calls it only in the worker processes it starts."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no mallopt (macOS, Windows): their allocators differ
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)
