"""Tensors and parameters through ``Client`` and ``AsyncClient`` and back, bit-exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.fakes.broker import FakeBroker
from tests.support.tensors import assert_same_tensors, mixed_numpy_inputs, mixed_torch_inputs


async def test_torch_tensors_of_every_dtype_and_layout_come_back_bit_exact_from_run(
    client: Any,
) -> None:
    inputs = mixed_torch_inputs()

    result = await client.run("echo", inputs)

    assert_same_tensors(inputs, result.outputs)


async def test_torch_tensors_come_back_bit_exact_from_a_submitted_task(client: Any) -> None:
    inputs = mixed_torch_inputs()

    handle = await client.submit("echo", inputs)
    result = await handle.result(timeout=10)

    assert_same_tensors(inputs, result.outputs)
    assert result.task_id == handle.task_id


async def test_numpy_inputs_come_back_as_numpy_arrays_bit_exact(client: Any) -> None:
    inputs = mixed_numpy_inputs()

    result = await client.run("echo", inputs)

    for sent, got in zip(inputs, result.outputs, strict=True):
        assert isinstance(got, np.ndarray)
        assert (got.dtype, got.shape) == (sent.dtype, sent.shape)
        assert got.tobytes() == sent.tobytes()


async def test_a_single_tensor_has_a_single_output(client: Any) -> None:
    result = await client.run("echo", np.arange(5.0), output="torch")

    assert torch.equal(result.output, torch.arange(5.0, dtype=torch.float64))


async def test_a_result_can_be_fetched_later_by_task_id_in_either_kind(client: Any) -> None:
    handle = await client.submit("echo", [np.arange(4, dtype=np.int32)])

    as_torch = await client.task(handle.task_id).result()
    as_numpy = await client.task(handle.task_id).result(output="numpy")

    assert torch.equal(as_torch.output, torch.arange(4, dtype=torch.int32))
    assert isinstance(as_numpy.output, np.ndarray)


async def test_parameters_arrive_with_their_types(client: Any, fake: FakeBroker) -> None:
    handle = await client.submit("echo", torch.ones(1), n=3, scale=0.5, mode="fast", flag=True)

    params = fake.params[handle.task_id]

    assert params == {"n": 3, "scale": 0.5, "mode": "fast", "flag": True}
    assert type(params["flag"]) is bool and type(params["n"]) is int


async def test_a_parameter_of_a_bad_type_fails_before_anything_is_sent(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(TypeError, match="parameter 'weights' is a list"):
        await client.run("echo", torch.ones(1), weights=[1, 2])

    assert fake.tasks == {}


async def test_an_input_dtype_the_wire_cannot_carry_is_refused_before_sending(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        await client.run("echo", np.array(["text"]))

    assert fake.tasks == {}
