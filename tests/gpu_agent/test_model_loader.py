"""Loading users' models on the agent: real models round-trip; hostile files never run."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from gpubroker.client.export import export_model
from gpubroker.gpu_agent.model_loader import ModelRejectedError, load_model
from gpubroker.protos import modelfile


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    norm = nn.BatchNorm2d(4)
    # Running statistics other than the defaults, so that they must travel.
    norm.running_mean = torch.empty(4).uniform_(-1, 1)
    norm.running_var = torch.empty(4).uniform_(0.5, 2)
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)
    )
    return cnn.eval()


def _transformer() -> nn.Module:
    torch.manual_seed(2)
    return nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (8,)),
    "cnn": (_cnn, (3, 8, 8)),
    "transformer": (_transformer, (5, 16)),
}


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # With gradients on, TransformerEncoderLayer takes its plain path (the same ATen ops as the
    # export); under no_grad it would take the fused fast path, whose rounding differs.
    with torch.enable_grad():
        out: torch.Tensor = module(x)
    return out.detach()


@pytest.mark.parametrize("name", MODELS)
def test_an_exported_model_loads_and_gives_the_modules_outputs(name: str) -> None:
    build, features = MODELS[name]
    module = build()
    x = torch.randn(4, *features)
    data = export_model(module, (x,))

    model = load_model(data, expected_id=modelfile.model_id(data), max_bytes=len(data))

    assert model.model_id == modelfile.model_id(data)
    (out,) = model(x)
    assert torch.equal(out, _reference(module, x))


@pytest.mark.parametrize("name", MODELS)
def test_a_varying_batch_dimension_runs_at_batch_sizes_1_3_and_7(name: str) -> None:
    build, features = MODELS[name]
    module = build()
    model = load_model(export_model(module, (torch.randn(4, *features),), batch_dim_varies=True))

    for batch in (1, 3, 7):
        x = torch.randn(batch, *features)
        (out,) = model(x)
        # A symbolic batch can change how the graph's matmuls are tiled (the transformer's
        # attention differed in the last bit at batch 3): equal to float32 rounding, not exact.
        torch.testing.assert_close(out, _reference(module, x), rtol=1e-5, atol=1e-6)


def test_exporting_the_same_module_twice_gives_the_same_id() -> None:
    example = (torch.randn(4, 5, 16),)

    first = export_model(_transformer(), example, batch_dim_varies=True)
    second = export_model(_transformer(), example, batch_dim_varies=True)

    assert modelfile.model_id(first) == modelfile.model_id(second)


# Hostile files. Each would do something visible if it ran: it is refused before anything runs.


class _TouchesAFile:
    """Unpickling this creates ``path`` (what a real payload does with a shell command)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return open, (str(self.path), "w")


def _with_weights(data: bytes, weights: bytes) -> bytes:
    parsed = modelfile.parse(data)
    return modelfile.pack(parsed.metadata, parsed.graph, weights)


def _with_graph(data: bytes, edit: Callable[[dict[str, object]], None]) -> bytes:
    parsed = modelfile.parse(data)
    graph = json.loads(parsed.graph)
    edit(graph)
    return modelfile.pack(parsed.metadata, json.dumps(graph).encode(), parsed.weights)


def _set_target(target: str) -> Callable[[dict[str, object]], None]:
    def edit(graph: dict[str, object]) -> None:
        graph["graph_module"]["graph"]["nodes"][0]["target"] = target  # type: ignore[index]

    return edit


@pytest.fixture(scope="module")
def valid() -> bytes:
    return export_model(_mlp(), (torch.randn(4, 8),), batch_dim_varies=True)


def test_a_pickle_where_the_weights_go_is_refused_and_never_unpickled(
    valid: bytes, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payloads = [pickle.dumps(_TouchesAFile(marker))]
    torch.save({"0.weight": _TouchesAFile(marker)}, tmp_path / "archive.pt")
    payloads.append((tmp_path / "archive.pt").read_bytes())
    pickled_header = pickle.dumps(_TouchesAFile(marker))
    payloads.append(struct.pack("<Q", len(pickled_header)) + pickled_header)

    for payload in payloads:
        with pytest.raises(ModelRejectedError, match=r"safetensors|weights"):
            load_model(_with_weights(valid, payload))

    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("torch.ops.aten.from_file.default", "aten::from_file is not allowed"),
        ("torch.ops.aten.save.default", "aten::save is not allowed"),
        ("torch.ops.aten._load_for_mobile.default", "aten::_load_for_mobile is not allowed"),
        ("torch.ops.evil.run_shell.default", "'torch.ops.evil.run_shell.default' is not allowed"),
        ("torch.ops.profiler._record_function_enter.default", "profiler"),
        ("torch.ops.higher_order.cond", "higher_order.cond"),
        ("torch.ops.aten.no_such_op.default", "aten::no_such_op.default is unknown"),
        ("os.system", "'os.system' is not allowed"),
        ("#evil:run", "'#evil:run' is not allowed"),
    ],
)
def test_a_graph_calling_a_refused_operator_is_rejected_naming_it(
    valid: bytes, target: str, message: str
) -> None:
    with pytest.raises(ModelRejectedError, match=message):
        load_model(_with_graph(valid, _set_target(target)))


def test_code_in_a_symbolic_size_is_rejected_and_never_evaluated(
    valid: bytes, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    text = modelfile.parse(valid).graph.decode()
    assert '"expr_str":"Symbol(' in text
    hostile = text.replace(
        '"expr_str":"Symbol(',
        f"\"expr_str\":\"__import__('pathlib').Path('{marker}').touch() or Symbol(",
        1,
    )

    with pytest.raises(ModelRejectedError, match="symbolic expression"):
        load_model(_with_graph(valid, lambda g: g.update(json.loads(hostile))))

    assert not marker.exists()


def test_a_truncated_file_is_rejected(valid: bytes) -> None:
    with pytest.raises(ModelRejectedError, match="but the file has"):
        load_model(valid[: len(valid) // 2])


def test_a_hash_that_does_not_match_is_rejected(valid: bytes) -> None:
    with pytest.raises(ModelRejectedError, match="model id mismatch"):
        load_model(valid, expected_id=modelfile.model_id(valid + b"x"))


def test_a_declared_size_that_lies_is_rejected(valid: bytes) -> None:
    data = bytearray(valid)
    weights_len = struct.unpack_from("<Q", data, 24)[0]
    struct.pack_into("<Q", data, 24, weights_len - 8)

    with pytest.raises(ModelRejectedError, match=f"weights {weights_len - 8}"):
        load_model(bytes(data))


def test_a_file_over_the_size_limit_is_rejected(valid: bytes) -> None:
    with pytest.raises(ModelRejectedError, match=f"over the limit of {len(valid) - 1}"):
        load_model(valid, max_bytes=len(valid) - 1)


def test_weights_that_do_not_fit_the_graph_are_rejected(valid: bytes) -> None:
    other = export_model(_cnn(), (torch.randn(2, 3, 8, 8),))

    with pytest.raises(ModelRejectedError, match="could not be rebuilt"):
        load_model(_with_weights(valid, modelfile.parse(other).weights))


def test_the_loader_still_serves_after_refusals(valid: bytes) -> None:
    for hostile in (valid[:40], valid + b"\0", _with_graph(valid, _set_target("os.system"))):
        with pytest.raises(ModelRejectedError):
            load_model(hostile)

    (out,) = load_model(valid)(torch.ones(2, 8))
    assert out.shape == (2, 4)
