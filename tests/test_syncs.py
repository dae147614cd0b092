"""hpc.syncs: which aten ops count as host-device synchronisations."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from hpc.syncs import count_syncs, measure

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def test_item_and_equal_are_two_syncs():
    x = torch.arange(6.0).view(2, 3)

    def f(t):
        s = t.sum().item()
        return s, torch.equal(t, t + 0)

    with count_syncs() as c:
        f(x)
    assert c.syncs == 2
    assert c.sync_ops == Counter({"aten::_local_scalar_dense": 1, "aten::equal": 1})
    assert c.ops == 4  # sum, _local_scalar_dense, add, equal
    assert c.op_counts["aten::sum"] == 1


def test_pure_tensor_function_has_no_sync():
    def f(t):
        m = t > 2
        y = torch.where(m, t * 2, t.new_zeros(()))
        return y.cumsum(1).amax(dim=1), torch.nonzero_static(m, size=4), t[:, 1:], t[t.new_zeros(2).long()]

    c = measure(f, torch.arange(6.0).view(2, 3), calls=3)
    assert c.syncs == 0 and not c.sync_ops and c.host_tensors == 0
    assert c.calls == 3 and c.ops > 0 and c.ops_per_call == c.ops / 3 and c.syncs_per_call == 0


@pytest.mark.parametrize("name, fn", [
    ("aten::_local_scalar_dense", lambda x: bool(x[0, 0] > 1)),
    ("aten::_local_scalar_dense", lambda x: float(x.mean())),
    ("aten::nonzero", lambda x: x.nonzero()),
    ("aten::nonzero", lambda x: torch.where(x > 1)),
    ("aten::masked_select", lambda x: x.masked_select(x > 1)),
    ("aten::index", lambda x: x[x > 1]),
    ("aten::index_put_", lambda x: x.clone().__setitem__(x > 1, torch.zeros(()))),
    ("aten::_unique2", lambda x: x.unique()),
    ("aten::bincount", lambda x: x.long().flatten().bincount()),
    ("aten::repeat_interleave", lambda x: torch.repeat_interleave(x.long().flatten())),
    ("aten::_to_copy", lambda x: x.to("meta")),
    ("aten::copy_", lambda x: torch.empty(2, 3, device="meta").copy_(x)),
])
def test_each_kind_of_sync_is_named(name, fn):
    with count_syncs() as c:
        fn(torch.arange(6.0).view(2, 3))
    assert c.sync_ops[name] >= 1 and c.syncs == sum(c.sync_ops.values()), c.sync_ops


def test_what_does_not_count():
    x = torch.arange(6.0).view(2, 3)
    with count_syncs() as c:
        torch.repeat_interleave(x, torch.tensor([1, 2]), dim=0, output_size=3)  # size given
        x.repeat_interleave(2)  # Python repeats
        x.to(torch.float64)  # same device
        torch.nonzero_static(x, size=2)
        x[torch.tensor([0, 1])]  # integer index
    assert c.syncs == 0, c.sync_ops
    assert c.host_tensors == 2  # the two torch.tensor(...) built from Python data


def test_cpu_is_device_false_ignores_cpu_scalars():
    x = torch.arange(6.0)
    with count_syncs(cpu_is_device=False) as c:
        x.sum().item()
        torch.equal(x, x)
        x.to("meta")  # a copy across devices still counts
    assert c.sync_ops == Counter({"aten::_to_copy": 1})
