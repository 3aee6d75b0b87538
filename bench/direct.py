"""The direct-gRPC baseline: an agent-like server that runs workloads on the ``Run`` call itself.

It speaks the broker's client API (so the same ``client.Client`` drives both) with the same codec,
the same chunk framing (``gpubroker.protos.frames``) and the same workload runner, but no queue, no
database, no spool and no second hop: what a user would get by calling a GPU box directly. ``python
-m bench.direct --port-file F``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import click
import grpc
import torch

from gpubroker.broker.api.registration import add_servicer
from gpubroker.client.codec import decode, empty_buffer, encode
from gpubroker.gpu_agent.runner import Runner, detect_device, favour_workload_threads
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import meta_from_proto, meta_to_proto, params_from_proto
from gpubroker.protos.frames import chunk_data, chunk_messages
from gpubroker.protos.transport import MAX_MESSAGE_BYTES
from gpubroker.protos.wire import Assembler
from tests.support.cluster import AGENT_DEVICE_ENV


class DirectServicer(broker_pb2_grpc.BrokerServicer):
    """Runs each ``Run`` call's workload at once and streams the result back.

    Only ``Run`` and ``RunMany`` are served; the other RPCs keep the generated UNIMPLEMENTED
    answers.
    """

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def Run(  # type: ignore[override]  # chunks go out as bytes (protos.frames)
        self,
        request_iterator: AsyncIterator[broker_pb2.RunRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[broker_pb2.RunResponse | bytes]:
        messages = aiter(request_iterator)
        first = await anext(messages)
        assembler = Assembler([meta_from_proto(h) for h in first.header.inputs], empty_buffer)
        async for message in messages:  # assembled as it streams in, as the agent does
            assembler.feed(chunk_data(message))
        info, outputs = await self._execute(first.header, assembler)
        yield broker_pb2.RunResponse(task=info)
        for chunk in chunk_messages(broker_pb2.RunResponse, outputs):
            yield chunk

    async def RunMany(
        self,
        request_iterator: AsyncIterator[broker_pb2.RunManyRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[broker_pb2.RunManyResponse]:
        done: asyncio.Queue[broker_pb2.InlineOutcome | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(task: broker_pb2.InlineTask) -> None:
            done.put_nowait(await self._run_inline(task))

        async def read() -> None:
            async for request in request_iterator:
                for task in request.tasks:
                    job = asyncio.create_task(one(task))
                    running.add(job)
                    job.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            finished = False
            while not finished:
                item = await done.get()
                outcomes = []
                while item is not None:
                    outcomes.append(item)
                    if done.empty():
                        break
                    item = done.get_nowait()
                finished = item is None
                if outcomes:
                    yield broker_pb2.RunManyResponse(outcomes=outcomes)
        finally:
            reader.cancel()

    async def _run_inline(self, task: broker_pb2.InlineTask) -> broker_pb2.InlineOutcome:
        assembler = Assembler([meta_from_proto(h) for h in task.header.inputs], empty_buffer)
        assembler.feed(task.data)
        info, outputs = await self._execute(task.header, assembler)
        return broker_pb2.InlineOutcome(
            index=task.index, task=info, data=b"".join(outputs), data_inline=True
        )

    async def _execute(
        self, header: broker_pb2.TaskHeader, assembler: Assembler
    ) -> tuple[task_pb2.TaskInfo, list[memoryview]]:
        """Decodes the fed inputs, runs the workload, encodes the outputs."""
        metas = [meta_from_proto(h) for h in header.inputs]
        buffers = assembler.finish()
        inputs = [cast(torch.Tensor, decode(m, b)) for m, b in zip(metas, buffers, strict=True)]
        params = params_from_proto(header.params)
        outcome = await self._runner.run(header.workload, inputs, params, threading.Event())
        encoded = [encode(t) for t in outcome.outputs]
        info = task_pb2.TaskInfo(
            task_id=uuid.uuid4().hex,
            workload=header.workload,
            state=task_pb2.TASK_STATE_SUCCEEDED,
            attempt=1,
            outputs=[meta_to_proto(m) for m, _ in encoded],
            compute_seconds=outcome.compute_seconds,
            gpu_type=self._runner.device.gpu_type,
        )
        return info, [data for _, data in encoded]


async def _serve(port_file: Path, slots: int, device: str) -> None:
    favour_workload_threads()  # as the agent does, so only the relay differs
    runner = Runner(detect_device(device), slots)
    await runner.warm_up()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    # The same chunk fast path (protos.frames) as the broker's, so only the relay differs.
    add_servicer(server, broker_pb2.DESCRIPTOR.services_by_name["Broker"], DirectServicer(runner))  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(f"{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    runner.close()


@click.command()
@click.option("--port-file", type=click.Path(path_type=Path), required=True)
@click.option("--slots", type=int, default=2, show_default=True)
@click.option(
    "--device", default="cpu", show_default=True, envvar=AGENT_DEVICE_ENV, help="cpu or cuda."
)
def main(port_file: Path, slots: int, device: str) -> None:
    """Serves the direct baseline on a free loopback port, written to PORT_FILE."""
    asyncio.run(_serve(port_file, slots, device))


if __name__ == "__main__":
    main()
