"""Reusable buffers for the large activations a cache keeps (CPU on Linux).

Caching every hook keeps about three times the memory Hugging Face returns with
``output_hidden_states`` and ``output_attentions``: attention scores and patterns of
both towers and the MLP activations dominate it. On the CPU, each fresh 4 KiB page
of that memory costs a page fault the first time an op writes it, and freed
memory goes back to the operating system, so every ``run_with_cache`` pays those
faults again. Profiling put about a third of a full-cache forward there.

The attention and MLP components therefore write those tensors, when a hook
watches them, into buffers from :data:`activation_pool`:

* each buffer is an anonymous private mapping advised for transparent huge pages
  (one fault per 2 MiB instead of per 4 KiB, where the kernel allows it);
* when the last tensor (or view) on a buffer is freed, the buffer returns to the
  pool and the next forward with the same shapes reuses it with no fault at all.

Values are exactly those of the ordinary path (the same kernels write into the
buffer through ``out=``). The pool keeps at most ``limit_bytes`` of free buffers;
``activation_pool.clear()`` hands them back, ``activation_pool.enabled = False``
turns the mechanism off. Elsewhere (GPU, other systems) nothing changes.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
import weakref
from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ActivationPool", "activation_pool", "pooled_empty", "watched"]

_PAGE = mmap.PAGESIZE


def _huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


class ActivationPool:
    """Free buffers by byte size; see the module docstring.

    ``min_bytes``: smaller tensors use the ordinary allocator (the heap reuses them well).
    ``limit_bytes``: the most free memory the pool keeps for reuse (buffers beyond it are unmapped).
    """

    def __init__(self, limit_bytes: int = 1 << 30, min_bytes: int = 1 << 20):
        self.supported = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
        self.enabled = self.supported
        self.limit_bytes = limit_bytes
        self.min_bytes = min_bytes
        self.huge = _huge_page_size() if self.supported else _PAGE
        self._free: dict[int, list] = defaultdict(list)
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.mapped = 0  # buffers created so far
        self.reused = 0  # requests served from the free list

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def clear(self) -> None:
        """Drop every free buffer (their memory goes back to the system)."""
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    def wants(self, nbytes: int, device: torch.device) -> bool:
        return self.enabled and device.type == "cpu" and nbytes >= max(1, self.min_bytes)

    def _take(self, size: int):
        with self._lock:
            bucket = self._free.get(size)
            if bucket:
                self._free_bytes -= size
                self.reused += 1
                return bucket.pop()
        mapping = mmap.mmap(-1, size + self.huge, flags=mmap.MAP_PRIVATE)
        probe = torch.frombuffer(mapping, dtype=torch.uint8, count=1)
        offset = (-probe.data_ptr()) % self.huge
        del probe
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE, offset, size)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages, still reused
            pass
        self.mapped += 1
        return mapping, offset

    def _give_back(self, size: int, buffer) -> None:
        with self._lock:
            if self._free_bytes + size <= self.limit_bytes:
                self._free[size].append(buffer)
                self._free_bytes += size

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised CPU tensor on a pooled buffer (reused once nothing refers to it)."""
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        buffer = self._take(size)
        mapping, offset = buffer
        view = memoryview(mapping)[offset:offset + nbytes]
        finalizer = weakref.finalize(view, self._give_back, size, buffer)
        finalizer.atexit = False
        return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(tuple(shape))


activation_pool = ActivationPool()


def watched(hook) -> bool:
    """Whether anything is attached to a HookPoint (a cache may keep what passes through it)."""
    return bool(hook.fwd_hooks or hook.bwd_hooks or hook._forward_hooks or hook._backward_hooks)


def pooled_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device, hook, *inputs: Tensor
                 ) -> Optional[Tensor]:
    """A pooled buffer for an op's ``out=`` when ``hook`` (the HookPoint the result goes through) is
    watched and the result is large; else None, and the op allocates as usual. ``inputs`` are the
    op's tensor arguments: ops that autograd records (``out=`` cannot be differentiated) allocate as usual."""
    if not activation_pool.enabled or not watched(hook):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return None
    if not activation_pool.wants(math.prod(shape) * dtype.itemsize, device):
        return None
    return activation_pool.empty(shape, dtype)
