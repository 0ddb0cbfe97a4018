"""The host's resident memory under glibc: which allocations are mapped directly, and handing freed heap pages
back to the system. Every function is a no-op where glibc is not the C library."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: glibc's `mallopt` parameter for the size above which allocations are mapped directly.
_M_MMAP_THRESHOLD = -3
#: the thresholds of the open `large_allocations_mapped` blocks, innermost last
_fixed: list[int] = []


def _libc(name: str) -> Callable | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


@contextmanager
def large_allocations_mapped(during: int = 1 << 20, after: int = 32 << 20) -> Iterator[None]:
    """glibc only: for the block, allocations above `during` bytes are mapped directly, so each one goes back to
    the system when freed. By default glibc raises this threshold (up to 32 MiB) as large blocks are freed, after
    which a layer's float32 weights and a refine step's temporaries come from the heap and stay resident when
    freed: measured on a 0.5B checkpoint, 1.46 GiB peak RSS against 1.14 GiB with the threshold fixed at 1 MiB
    (calling `malloc_trim` between steps does not help; smaller freed blocks are trimmed before each fit, see
    `hf_gqa.onload.free_tensors_under`). Afterwards the threshold is the enclosing block's, or outside every block
    fixed at `after` bytes (32 MiB: where glibc's own adjustment ends in a process that has freed large tensors;
    glibc cannot be put back to adjusting it). Elsewhere, a no-op."""
    mallopt = _libc("mallopt")
    changed = bool(mallopt and mallopt(_M_MMAP_THRESHOLD, during))
    if changed:
        _fixed.append(during)
    try:
        yield
    finally:
        if changed:
            _fixed.pop()
            mallopt(_M_MMAP_THRESHOLD, _fixed[-1] if _fixed else after)


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system (`malloc_trim`: glibc keeps freed heap pages otherwise,
    and the resident set then grows with the largest tensors seen, not with what is alive)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


__all__ = ["large_allocations_mapped", "release_freed_memory"]
