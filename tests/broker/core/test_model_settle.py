"""A model call cancelled while its commit runs still brings memory and files in line with it.

The store here is a stand-in whose delete commits only when the test says so, and the file
store a recorder: the peer hangs up between the start of the commit and its end.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gpubroker.broker.config import ModelLimits
from gpubroker.broker.core.models import ModelService
from gpubroker.broker.errors import ModelNotFoundError
from gpubroker.broker.model import ModelRecord
from tests.support.waiting import wait_for

MODEL_ID = "ab" * 32
RECORD = ModelRecord("tenant-a", MODEL_ID, "m", 10, {"inputs": []}, datetime.now(UTC))


class _SlowStore:
    def __init__(self) -> None:
        self.commit = asyncio.Event()
        self.deleting = False

    async def models(self) -> list[ModelRecord]:
        return [RECORD]

    async def delete_model(self, tenant: str, model_id: str) -> tuple[ModelRecord, bool]:
        self.deleting = True
        await self.commit.wait()
        return RECORD, True


class _Files:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def open(self) -> None:
        return None

    def sweep(self, keep: set[str]) -> None:
        return None

    def delete(self, model_id: str) -> None:
        self.deleted.append(model_id)


async def test_a_delete_cancelled_during_its_commit_still_forgets_the_model_and_its_file() -> None:
    store, files = _SlowStore(), _Files()
    service = ModelService(store, files, ModelLimits())  # type: ignore[arg-type]
    await service.start()

    call = asyncio.create_task(service.delete("tenant-a", MODEL_ID))
    await wait_for(lambda: store.deleting, 5, "the delete to start committing")
    call.cancel()  # the peer hangs up mid-commit...
    with pytest.raises(asyncio.CancelledError):
        await call
    store.commit.set()  # ...and the row's deletion commits afterwards

    await wait_for(lambda: files.deleted == [MODEL_ID], 5, "the file to go with the row")
    with pytest.raises(ModelNotFoundError):
        service.get("tenant-a", MODEL_ID)
