"""The model cache: one fetch per model, checked bytes, LRU limits on disk and device, rescans."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import torch

from gpubroker.gpu_agent.errors import ModelUnusableError
from gpubroker.gpu_agent.model import ModelRef
from gpubroker.gpu_agent.model_cache import FetchModel, ModelCache, warm_up_inputs
from gpubroker.gpu_agent.runner import Runner, detect_device
from gpubroker.protos import modelfile
from tests.gpu_agent.models import model_file, model_id


class Served:
    """Model files served as a stream of chunks, each fetch counted."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def fetch(self, data: bytes, model: str = "") -> FetchModel:
        async def chunks() -> AsyncIterator[bytes]:
            self.fetched.append(model)
            for start in range(0, len(data), 4096):
                await asyncio.sleep(0)
                yield data[start : start + 4096]

        return chunks


@pytest.fixture
def runner() -> Iterator[Runner]:
    runner = Runner(detect_device("cpu"), 2, {})
    yield runner
    runner.close()


CacheFactory = Callable[..., ModelCache]


@pytest.fixture
def cache_in(tmp_path: Path, runner: Runner) -> CacheFactory:
    def make(disk_bytes: int = 1 << 30, device_bytes: int = 1 << 30) -> ModelCache:
        cache = ModelCache(tmp_path / "models", disk_bytes, device_bytes, runner)
        cache.scan()
        return cache

    return make


def _ref(name: str) -> ModelRef:
    return ModelRef(model_id(name), len(model_file(name)))


async def test_a_model_is_fetched_once_then_served_from_the_device(cache_in: CacheFactory) -> None:
    cache, served = cache_in(), Served()

    first = await cache.acquire(_ref("mlp"), served.fetch(model_file("mlp")))
    second = await cache.acquire(_ref("mlp"), served.fetch(model_file("mlp")))

    assert cache.fetches == 1 and len(served.fetched) == 1 and cache.loads == 1
    assert first.load_seconds > 0 and second.load_seconds == 0.0
    assert second.model is first.model
    assert (cache.directory / model_id("mlp")).read_bytes() == model_file("mlp")


async def test_concurrent_needs_share_one_fetch_and_one_load(cache_in: CacheFactory) -> None:
    cache, served = cache_in(), Served()

    got = await asyncio.gather(
        *(cache.acquire(_ref("cnn"), served.fetch(model_file("cnn"))) for _ in range(8))
    )

    assert cache.fetches == 1 and cache.loads == 1
    assert len({id(a.model) for a in got}) == 1
    assert all(a.load_seconds > 0 for a in got)


@pytest.mark.parametrize(
    ("served_bytes", "message"),
    [
        (lambda data: data[:-10], r"got \d+ of its \d+ bytes"),
        (lambda data: data + b"x", r"sent more than its \d+ bytes"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "sha256 is [0-9a-f]{64}, not its id"),
    ],
    ids=["truncated", "too-long", "hash-mismatch"],
)
async def test_a_file_of_the_wrong_size_or_hash_is_refused_and_nothing_kept(
    cache_in: CacheFactory, served_bytes: Callable[[bytes], bytes], message: str
) -> None:
    cache, served = cache_in(), Served()

    with pytest.raises(ModelUnusableError, match=message):
        await cache.acquire(_ref("mlp"), served.fetch(served_bytes(model_file("mlp"))))

    assert list(cache.directory.iterdir()) == []
    assert cache.held() == []
    got = await cache.acquire(_ref("mlp"), served.fetch(model_file("mlp")))
    assert got.model.model_id == model_id("mlp")


async def test_a_graph_the_loader_refuses_fails_and_its_file_is_deleted(
    cache_in: CacheFactory,
) -> None:
    parsed = modelfile.parse(model_file("mlp"))
    hostile = modelfile.pack(
        parsed.metadata,
        parsed.graph.replace(b"torch.ops.aten.linear.default", b"os.system"),
        parsed.weights,
    )
    ref = ModelRef(modelfile.model_id(hostile), len(hostile))
    cache = cache_in()

    with pytest.raises(ModelUnusableError, match=r"was refused: .*os\.system"):
        await cache.acquire(ref, Served().fetch(hostile))

    assert list(cache.directory.iterdir()) == [] and cache.held() == []


async def test_disk_keeps_the_most_recently_used_files_under_its_limit(
    cache_in: CacheFactory,
) -> None:
    sizes = {name: len(model_file(name)) for name in ("mlp", "cnn", "transformer")}
    cache, served = cache_in(disk_bytes=sizes["transformer"] + sizes["mlp"]), Served()

    for name in ("mlp", "cnn", "mlp", "transformer"):  # the cnn is least recently used
        await cache.acquire(_ref(name), served.fetch(model_file(name)))

    assert cache.on_disk() == [model_id("transformer"), model_id("mlp")]
    assert sorted(p.name for p in cache.directory.iterdir()) == sorted(cache.on_disk())


async def test_a_file_larger_than_the_disk_limit_is_still_kept_while_newest(
    cache_in: CacheFactory,
) -> None:
    cache = cache_in(disk_bytes=10)

    await cache.acquire(_ref("mlp"), Served().fetch(model_file("mlp")))

    assert cache.on_disk() == [model_id("mlp")]


async def test_the_device_keeps_the_most_recently_used_models_under_its_limit(
    cache_in: CacheFactory,
) -> None:
    limit = len(model_file("transformer")) + len(model_file("cnn"))
    cache, served = cache_in(device_bytes=limit), Served()

    for name in ("mlp", "cnn", "mlp", "transformer"):
        await cache.acquire(_ref(name), served.fetch(model_file(name)))
    again = await cache.acquire(_ref("cnn"), served.fetch(model_file("cnn")))

    assert cache.fetches == 3  # cnn came back from disk, not from the broker
    assert again.load_seconds > 0 and cache.loads == 4
    assert cache.resident()[0] == model_id("cnn") and model_id("mlp") not in cache.resident()
    assert cache.held()[:2] == [model_id("cnn"), model_id("transformer")]


async def test_at_least_one_model_stays_loaded_however_small_the_limit(
    cache_in: CacheFactory,
) -> None:
    cache = cache_in(device_bytes=1)

    await cache.acquire(_ref("mlp"), Served().fetch(model_file("mlp")))

    assert cache.resident() == [model_id("mlp")]


async def test_a_restart_keeps_verified_files_and_deletes_the_rest(
    cache_in: CacheFactory,
) -> None:
    cache, served = cache_in(), Served()
    for name in ("mlp", "cnn"):
        await cache.acquire(_ref(name), served.fetch(model_file(name)))
    folder = cache.directory
    os.utime(folder / model_id("mlp"), (2e9, 2e9))  # used last
    (folder / ("0" * 64)).write_bytes(b"not the file of that hash")
    (folder / ".fetch-abc.part").write_bytes(b"half a download")
    (folder / "notes.txt").write_text("stray")

    restarted = cache_in()

    assert restarted.on_disk() == [model_id("mlp"), model_id("cnn")]
    assert sorted(p.name for p in folder.iterdir()) == sorted([model_id("mlp"), model_id("cnn")])
    got = await restarted.acquire(_ref("cnn"), Served().fetch(b""))
    assert restarted.fetches == 0 and got.model.model_id == model_id("cnn")


def test_warm_up_inputs_are_zeros_with_a_batch_of_one() -> None:
    metadata = {
        "inputs": [{"dtype": "float32", "shape": [None, 3]}, {"dtype": "int64", "shape": []}]
    }

    first, second = warm_up_inputs(metadata)

    assert first.shape == (1, 3) and first.dtype == torch.float32 and not first.any()
    assert second.shape == () and second.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_on_cuda_a_model_loads_onto_the_device_and_is_timed_with_events(
    tmp_path: Path,
) -> None:
    runner = Runner(detect_device("cuda"), 2, {})
    try:
        cache = ModelCache(tmp_path / "models", 1 << 30, 1 << 30, runner)
        cache.scan()
        got = await cache.acquire(_ref("transformer"), Served().fetch(model_file("transformer")))
        outcome = await runner.call_model(got.model, [torch.randn(3, 5, 16)])
    finally:
        runner.close()

    assert all(p.device.type == "cuda" for p in got.model.program.state_dict.values())
    assert outcome.outputs[0].device.type == "cpu" and outcome.outputs[0].shape == (3, 5, 16)
    assert 0 < outcome.compute_seconds < got.load_seconds
