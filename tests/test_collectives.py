"""Every collective of the NCCL-only paths gets a tensor on the training device.

NCCL refuses host tensors ("No backend type associated with device type cpu"), gloo accepts
everything, and one GPU skips the collectives: so neither the CPU runs of the FSDP tests nor a
one-GPU run can see a host tensor handed to a collective. Here each collective is replaced by a
check of where its tensor lives, with a training device that is not the CPU: a recording
stand-in of Composer's device (as in test_callbacks' Throughput test), or the `meta` device for
paths whose tensors come from the parameters. The Throughput callback's own test is
`tests/test_callbacks.py::test_throughput_collectives_run_on_the_training_device`.
"""

from __future__ import annotations

import pytest
import torch
from composer.utils import dist
from helpers import TrainingDevice

from ettin.callbacks import grad_norm as grad_norm_module
from ettin.parallel import fsdp

META = torch.device("meta")


def _batch(rows: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(rows * 8).view(rows, 8) % 50 + 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _split(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    rows = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]


def test_equal_microbatch_split_all_reduces_on_the_training_device(monkeypatch):
    """Composer 0.32 calls split_batch on the host batch: its count must move to the device.

    The batch here is on the CPU, as Composer hands it; another rank needs 3 microbatches.
    """
    device, reduced = TrainingDevice(), []

    def all_reduce(tensor: torch.Tensor, reduce_operation: str = "SUM") -> None:
        assert any(tensor is t for t in device.moved), (
            f"all_reduce of a {tensor.device} tensor that never went to the training device"
        )
        tensor.fill_(3)
        reduced.append(reduce_operation)

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    split = fsdp.equal_microbatch_split(_split, microbatch_size=2, device=device)
    parts = split(_batch(4), 2)  # this rank alone would need 2 microbatches
    assert reduced == ["MAX"]
    assert [p["input_ids"].shape[0] for p in parts] == [1, 1, 2]
    assert split(_batch(4), 1) and reduced == [
        "MAX"
    ]  # Composer's eval-tail re-split: no collective


def test_grad_norm_all_reduces_on_the_parameters_device(monkeypatch):
    """Sharded norms: a rank holding no gradient of a group still reduces on the device."""
    seen: list[torch.device] = []
    monkeypatch.setattr(
        grad_norm_module.dist,
        "all_reduce",
        lambda tensor, reduce_operation="SUM": seen.append(tensor.device),
    )
    with_grad, without = (torch.nn.Parameter(torch.ones(3, device=META)) for _ in range(2))
    with_grad.grad = torch.ones(3, device=META)
    groups = [{"params": [with_grad]}, {"params": [without]}]  # group 1: no gradient here
    grad_norm_module.group_grad_norms(groups, sharded=True)
    assert seen == [META]


class _Mesh:
    ndim = 1

    def get_group(self) -> str:
        return "shard-group"


class _Reached(Exception):
    """Raised by the patched collective: the step got there, with a tensor on the device."""


def test_sharded_optimizer_all_reduces_on_the_parameters_device(monkeypatch):
    """The sharded StableAdamW step all-reduces its per-parameter sums where the shards live."""
    from ettin.optim.optimizer import StableAdamW

    params = []
    for shape in ((4, 3), (3,)):
        p = torch.nn.Parameter(torch.ones(shape, device=META))
        p.device_mesh = _Mesh()  # a DTensor's attributes, as `_sharded()` and `_local` read them
        p.to_local = lambda p=p: p.data
        p.grad = torch.ones(shape, device=META)
        params.append(p)
    seen = []

    def all_reduce(tensor, op=None, group=None):
        seen.append((tensor.device, group))
        raise _Reached

    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.all_reduce", all_reduce)
    opt = StableAdamW(params, lr=1e-3, kahan_sum=False, triton=False)
    with pytest.raises(_Reached):
        opt.step()
    assert seen == [(META, "shard-group")]
