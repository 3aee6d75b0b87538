"""The torch-free graph policy: what a model's graph JSON may name, checked without torch."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import pytest

from gpubroker.protos import modelcheck, modelfile
from gpubroker.protos.modelcheck import GraphRefusedError


def _document(*targets: str, **graph: Any) -> dict[str, Any]:
    nodes = [{"name": f"n{i}", "target": t} for i, t in enumerate(targets)]
    return {"graph_module": {"graph": {"nodes": nodes, **graph}}}


def test_aten_math_and_size_functions_pass() -> None:
    document = _document(
        "torch.ops.aten.linear.default", "_operator.mul", "torch.sym_max", "math.ceil"
    )

    modelcheck.check_graph(document)

    assert modelcheck.node_targets(document)[0] == "torch.ops.aten.linear.default"


def test_an_aten_target_is_handed_back_for_the_torch_side_checks() -> None:
    assert modelcheck.check_target("torch.ops.aten.add.Tensor") == ("add", "Tensor")
    assert modelcheck.check_target("_operator.getitem") is None


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("torch.ops.aten.from_file.default", "aten::from_file is not allowed"),
        ("torch.ops.aten.save.default", "aten::save is not allowed"),
        ("torch.ops.aten._load_for_mobile.default", "aten::_load_for_mobile is not allowed"),
        ("torch.ops.evil.run_shell.default", "'torch.ops.evil.run_shell.default' is not allowed"),
        ("torch.ops.higher_order.cond", "higher_order.cond"),
        ("os.system", "'os.system' is not allowed"),
        ("#evil:run", "'#evil:run' is not allowed"),
    ],
)
def test_a_refused_target_is_named(target: str, message: str) -> None:
    with pytest.raises(GraphRefusedError, match=message):
        modelcheck.check_graph(_document("torch.ops.aten.relu.default", target))


@pytest.mark.parametrize("key", sorted(modelcheck.REFUSED_KEYS))
def test_script_objects_subgraphs_and_operator_values_are_refused(key: str) -> None:
    document = _document("torch.ops.aten.relu.default", extra=[{key: {"name": "x"}}])

    with pytest.raises(GraphRefusedError, match=repr(key)):
        modelcheck.check_graph(document)


def test_empty_refused_fields_as_export_writes_them_pass() -> None:
    modelcheck.check_graph(_document("torch.ops.aten.relu.default", custom_obj_values={}))


def test_code_in_a_symbolic_size_is_refused() -> None:
    hostile = "__import__('os').system('touch pwned') or Symbol('s0')"
    document = _document("torch.ops.aten.relu.default", sym={"expr_str": hostile})

    with pytest.raises(GraphRefusedError, match="symbolic expression"):
        modelcheck.check_graph(document)


def test_a_sympy_size_expression_passes() -> None:
    modelcheck.check_sym_expr("Mul(Integer(2), Symbol('s0', integer=True, positive=True))")


def test_json_nested_past_the_limit_is_refused() -> None:
    deep: object = 1
    for _ in range(modelcheck.MAX_JSON_DEPTH + 1):
        deep = [deep]

    with pytest.raises(GraphRefusedError, match="nests deeper"):
        modelcheck.check_graph(_document("torch.ops.aten.relu.default", deep=deep))


@pytest.mark.parametrize(
    "document",
    [{}, {"graph_module": {"graph": {"nodes": {}}}}, _document() | {"graph_module": []}],
)
def test_a_document_that_is_not_an_exported_program_is_refused(document: object) -> None:
    with pytest.raises(GraphRefusedError, match="not an exported program"):
        modelcheck.check_graph(document)


def test_a_node_without_a_target_string_is_refused() -> None:
    document = {"graph_module": {"graph": {"nodes": [{"target": 7}]}}}

    with pytest.raises(GraphRefusedError, match="node 0"):
        modelcheck.check_graph(document)


def test_graph_bytes_that_are_not_json_are_refused() -> None:
    with pytest.raises(GraphRefusedError, match="not valid JSON"):
        modelcheck.check_graph_json(b"{nope")


# modelfile.check: parse's checks on a buffer, without the weights.


def _file() -> bytes:
    graph = json.dumps(_document("torch.ops.aten.relu.default")).encode()
    header = json.dumps({"state/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    weights = len(header).to_bytes(8, "little") + header.encode() + bytes(8)
    return modelfile.pack({"inputs": [], "outputs": []}, graph, weights)


def test_checking_a_memory_map_agrees_with_parse_and_lets_the_map_close(tmp_path: Path) -> None:
    data = _file()
    path = tmp_path / "m.model"
    path.write_bytes(data)

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
        summary = modelfile.check(m, expected_id=modelfile.model_id(data))

    parsed = modelfile.parse(data)
    assert (summary.model_id, summary.metadata, summary.graph, summary.tensors) == (
        parsed.model_id,
        parsed.metadata,
        parsed.graph,
        parsed.tensors,
    )


def test_a_refused_memory_map_still_closes(tmp_path: Path) -> None:
    data = _file()
    path = tmp_path / "m.model"
    path.write_bytes(data[:-12] + b"}" * 12)  # the safetensors header's JSON ends garbled

    with (
        open(path, "rb") as file,
        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m,
        pytest.raises(modelfile.ModelFileError, match="safetensors header is not valid JSON"),
    ):
        modelfile.check(m)


def test_a_digest_computed_while_receiving_is_trusted_instead_of_hashing_again() -> None:
    data = _file()

    with pytest.raises(modelfile.ModelFileError, match="model id mismatch"):
        modelfile.check(data, expected_id=modelfile.model_id(data), digest="0" * 64)
