"""``gpu=`` and ``min_gpu_memory=``: parsed on the client, carried in ``TaskHeader.requires``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gpubroker.client import FailedPreconditionError, GpuRequirement, TaskState
from gpubroker.client._requirement import parse_memory, requirement
from tests.fakes.broker import WAITING_FOR, FakeBroker, run_map


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("16GiB", 16 * 2**30),
        ("24GB", 24 * 10**9),
        ("24 gb", 24 * 10**9),
        ("1.5TiB", 3 * 2**39),
        ("512MiB", 512 * 2**20),
        ("80kb", 80_000),
        ("7B", 7),
    ],
)
def test_a_memory_size_is_bytes_or_a_number_with_a_unit(value: int | str, expected: int) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["", "GiB", "16 GiBs", "16Gb/s", "-1GB", "1e9", "lots", -5])
def test_an_unreadable_or_negative_memory_size_is_a_value_error(value: int | str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(value)


@pytest.mark.parametrize("value", [16.0, True, None])
def test_a_memory_size_of_another_type_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="int of bytes or a string"):
        parse_memory(value)


def test_no_arguments_ask_for_no_requirement() -> None:
    assert requirement(None, None) is None
    assert requirement(None, 0) is None
    assert requirement("nvidia-l4", None) == GpuRequirement("nvidia-l4", 0)


@pytest.mark.parametrize("call", ["run", "submit", "map"])
async def test_gpu_and_memory_fill_the_task_requirement(
    client: Any, fake: FakeBroker, call: str
) -> None:
    options = {"gpu": "nvidia-l4", "min_gpu_memory": "16GiB"}

    if call == "map":
        [result] = await run_map(client, "echo", [torch.ones(2)], **options)
        status = result.status
    elif call == "run":
        status = (await client.run("echo", torch.ones(2), **options)).status
    else:
        status = await (await client.submit("echo", torch.ones(2), **options)).status()

    [header] = fake.headers
    assert header.requires.gpu_type == "nvidia-l4"
    assert header.requires.min_memory_bytes == 16 * 2**30
    assert status.requires == GpuRequirement("nvidia-l4", 16 * 2**30)
    assert "gpu" not in fake.params.get(status.task_id, {})  # not sent as a workload param


async def test_a_task_without_gpu_arguments_leaves_the_requirement_unset(
    client: Any, fake: FakeBroker
) -> None:
    await client.run("echo", torch.ones(2))
    await run_map(client, "echo", [torch.ones(2)])

    assert [h.HasField("requires") for h in fake.headers] == [False, False]


async def test_a_models_requirement_applies_unless_the_task_names_one(
    client: Any, fake: FakeBroker
) -> None:
    model = await client.upload_model(nn.Linear(3, 2), (torch.ones(2, 3),), gpu="nvidia-t4")

    default = await client.run(model, torch.ones(2, 3))
    chosen = await client.run(model, torch.ones(2, 3), min_gpu_memory=24 * 10**9)

    assert default.status.requires == GpuRequirement("nvidia-t4", 0)
    assert chosen.status.requires == GpuRequirement(None, 24 * 10**9)


async def test_an_impossible_gpu_is_a_failed_precondition(client: Any) -> None:
    with pytest.raises(FailedPreconditionError, match="nvidia-h999"):
        await client.run("echo", torch.ones(2), gpu="nvidia-h999")
    with pytest.raises(FailedPreconditionError):
        await client.submit("echo", torch.ones(2), gpu="nvidia-h999")
    with pytest.raises(FailedPreconditionError):
        await run_map(client, "echo", [torch.ones(2)], gpu="nvidia-h999", raise_on_error=True)


@pytest.mark.parametrize("call", ["run", "submit", "map"])
async def test_a_bad_memory_size_is_a_value_error_before_any_rpc(
    client: Any, fake: FakeBroker, call: str
) -> None:
    with pytest.raises(ValueError, match="cannot read '16 gigs'"):
        if call == "map":
            await run_map(client, "echo", [torch.ones(2)], min_gpu_memory="16 gigs")
        else:
            await getattr(client, call)("echo", torch.ones(2), min_gpu_memory="16 gigs")

    assert fake.authorizations == []


async def test_a_waiting_task_says_what_it_waits_for(client: Any) -> None:
    handle = await client.submit("hold", torch.ones(1))

    status = await handle.status()

    assert status.state is TaskState.QUEUED
    assert status.waiting_for == WAITING_FOR
    assert (status.model_load_seconds, status.batch_tasks, status.model_id) == (0.0, 0, None)
    await handle.cancel()
