"""Count the aten ops of a block of code that would make the host wait for the GPU.

A training step should queue work on the device and never wait for it: one ``.item()``, one
``if tensor:``, one ``torch.equal`` or one data-dependent output shape (``nonzero``, boolean-mask
indexing, ``unique``...) stalls the CPU until the GPU has drained its queue. This module sees the
aten ops a block dispatches (a ``TorchDispatchMode``, so after autograd and after composite ops
are decomposed) and counts those that synchronise on CUDA, so a CPU-only test can assert that a
function has none::

    from hpc.syncs import count_syncs

    with count_syncs() as c:
        boxes, heat = attention_boxes(features, size=224)
    assert c.syncs == 0, c.sync_ops          # Counter({'aten::nonzero': 1, ...}) when not

    c = measure(attention_boxes, features, size=224, calls=5)
    c.ops_per_call                            # aten ops dispatched per call

What counts as a sync (``SYNC_OPS`` and :func:`sync_reason`):

* ``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``if t:``;
* ``aten::equal`` (``torch.equal``);
* output shapes that depend on the data: ``aten::nonzero`` (``torch.where(cond)``, ``argwhere``),
  ``aten::masked_select``, ``aten::unique*`` / ``aten::_unique*``, ``aten::bincount``,
  ``aten::repeat_interleave`` with a tensor of repeats and no ``output_size``, ``aten::index`` and
  ``aten::index_put_`` with a boolean (or uint8) mask among the indices (``x[mask]``,
  ``x[mask] = v``); ``aten::nonzero_static`` has a fixed size and does not count;
* copies between devices: ``aten::_to_copy`` / ``aten::copy_`` (``.to(device)``, ``.cpu()``,
  ``.tolist()`` of a device tensor) whose source and destination devices differ, except a
  ``non_blocking`` copy from pinned host memory to a device; and ``aten::lift_fresh`` of a
  non-CPU tensor, which is how ``torch.tensor([...], device="cuda")`` shows up: the Python data is
  copied from pageable host memory, a blocking copy.

Limits, by construction:

* By default (``cpu_is_device=True``) the counter treats every tensor as if it lived on the
  accelerator, which is what a CPU-only test wants: ``x.sum().item()`` on a CPU tensor counts.
  On a real GPU run pass ``cpu_is_device=False`` so that ``.item()`` of a CPU tensor (free) does
  not count.
* Copies count only where the two devices differ. On a CPU-only machine every tensor is on the
  CPU, so a ``.to(x.device)`` or ``torch.tensor([...], device=x.device)`` that would be a
  host-to-device copy on a GPU is invisible there. ``host_tensors`` helps: it counts the tensors
  made from Python data (``aten::lift_fresh``: ``torch.tensor(...)``, and the 0-dim tensor that
  ``x[i] = 3.0`` wraps its scalar in, which is harmless), so a CPU test can assert a hot path
  builds none. ``.tolist()`` and ``.numpy()`` of a CPU tensor dispatch nothing and are invisible.
* Only what reaches the Python dispatcher is seen: syncs inside a C++ kernel (e.g. a kernel that
  reads a device scalar internally) and syncs outside torch ops (``torch.cuda.synchronize``,
  CUDA events, ``non_blocking`` copies read on the host) are not.
* The op lists are the common cases, not an exhaustive audit of aten.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that always wait for the device (their result is a host value or a data-dependent shape).
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",
    "aten::equal",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::argwhere",
    "aten::masked_select",
    "aten::bincount",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::unique_dim_consecutive",
    "aten::_unique",
    "aten::_unique2",
})
_COPY_OPS = frozenset({"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize"})
_MASK_INDEX_OPS = frozenset({"aten::index", "aten::_unsafe_index", "aten::index_put", "aten::index_put_",
                             "aten::_index_put_impl_", "aten::_unsafe_index_put"})


@dataclass
class SyncCount:
    """What a block dispatched: ``ops`` aten ops, of which ``syncs`` force a host sync."""

    ops: int = 0
    syncs: int = 0
    sync_ops: Counter = field(default_factory=Counter)  # sync op name -> count
    op_counts: Counter = field(default_factory=Counter)  # every op name -> count
    host_tensors: int = 0  # tensors made from Python data (aten::lift_fresh), see the module doc
    calls: int = 1

    @property
    def ops_per_call(self) -> float:
        return self.ops / max(self.calls, 1)

    @property
    def syncs_per_call(self) -> float:
        return self.syncs / max(self.calls, 1)


def _is_cpu(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def _copy_devices(name: str, args: tuple, kwargs: dict) -> tuple[torch.device, torch.device, bool] | None:
    """(source, destination, non_blocking) of a copy op, or None."""
    if name == "aten::_to_copy":
        src = args[0]
        dst = kwargs.get("device") or src.device
        return src.device, torch.device(dst), bool(kwargs.get("non_blocking", False))
    if name == "aten::copy_":
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[1].device, args[0].device, bool(non_blocking)
    if name in ("aten::_copy_from", "aten::_copy_from_and_resize"):
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[0].device, args[1].device, bool(non_blocking)
    return None


def sync_reason(func: Any, args: tuple, kwargs: dict, cpu_is_device: bool = True) -> str | None:
    """The op's name if calling ``func(*args, **kwargs)`` forces a host sync on CUDA, else None."""
    name = func._schema.name
    if name in _COPY_OPS:
        src, dst, non_blocking = _copy_devices(name, args, kwargs)
        if src == dst:
            return None
        if non_blocking and src.type == "cpu":
            # An asynchronous host-to-device copy only if the host memory is pinned.
            host = args[0] if name in ("aten::_to_copy", "aten::_copy_from", "aten::_copy_from_and_resize") \
                else args[1]
            if host.is_pinned():
                return None
        return name
    if name == "aten::lift_fresh":
        return None if _is_cpu(args[0]) else name
    if not cpu_is_device and all(_is_cpu(t) for t in _tensors(args)):
        return None
    if name in SYNC_OPS:
        return name
    if name == "aten::repeat_interleave":
        # repeat_interleave(Tensor repeats) / (self, Tensor repeats): the output size is the sum of
        # the repeats unless the caller passes it.
        has_tensor_repeats = any(isinstance(a, torch.Tensor) for a in args[:2])
        return name if has_tensor_repeats and kwargs.get("output_size") is None else None
    if name in _MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return name
    return None


class SyncCounter(TorchDispatchMode):
    """Dispatch mode that fills a :class:`SyncCount`; use :func:`count_syncs`."""

    def __init__(self, result: SyncCount | None = None, cpu_is_device: bool = True):
        super().__init__()
        self.result = result if result is not None else SyncCount()
        self.cpu_is_device = cpu_is_device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = self.result
        name = func._schema.name
        r.ops += 1
        r.op_counts[name] += 1
        if name == "aten::lift_fresh":
            r.host_tensors += 1
        reason = sync_reason(func, args, kwargs, self.cpu_is_device)
        if reason is not None:
            r.syncs += 1
            r.sync_ops[reason] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(cpu_is_device: bool = True) -> Iterator[SyncCount]:
    """``with count_syncs() as c:`` counts the ops dispatched in the block into ``c``."""
    result = SyncCount()
    with SyncCounter(result, cpu_is_device):
        yield result


def measure(fn: Callable, *args: Any, calls: int = 1, cpu_is_device: bool = True, **kwargs: Any) -> SyncCount:
    """Call ``fn(*args, **kwargs)`` ``calls`` times under the counter; ``ops_per_call`` etc."""
    with count_syncs(cpu_is_device) as result:
        for _ in range(calls):
            fn(*args, **kwargs)
    result.calls = calls
    return result
