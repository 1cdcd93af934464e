"""The agent's memory, told to glibc: keep big buffers in the heap while running, hand freed
memory back after start-up (no-ops where glibc is not the allocator); and to the cycle collector:
run less often than for a program that makes few objects."""

from __future__ import annotations

import gc


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_allocator() -> None:
    """Keep glibc from handing every large buffer back to the kernel, and from growing arenas.

    The hot path makes a few MiB-sized temporaries per chunk; by default glibc serves each from
    a fresh mmap and unmaps it on free, so every page is faulted in again on the next chunk.
    Serving them from the heap (and trimming only past 32 MiB free) removes most page faults
    (bench/: shipper's minor faults per run). Two arenas are enough for a handful of threads
    (the default, 8 per core, keeps freed memory in each).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 16 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_arena_max, 2)


# Container objects allocated (net) before the youngest generation is collected; Python's default is 700.
COLLECT_AFTER = 10_000


def tune_collector() -> None:
    """Collect cycles after COLLECT_AFTER new containers, not 700: a batch makes tens of thousands of
    dicts and lists that reference counting frees anyway (the agent makes few cycles), and at the
    default the collector took 14% of the agent's CPU under load (bench/forward.py, gc.callbacks:
    0.63 s of 4.5; 0.03 s at 10,000). Garbage cycles still go, after at most that many containers."""
    gc.set_threshold(COLLECT_AFTER, 10, 10)


def trim_heap(collect: bool = False) -> None:
    """Give freed heap memory back now (the trim threshold keeps up to 32 MiB otherwise): after
    start-up, and after each large start-up temporary (botocore's models) so they do not add up."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
