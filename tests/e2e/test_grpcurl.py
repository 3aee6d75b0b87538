"""The real grpcurl binary can discover and call the broker through server reflection."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
import torch

from gpubroker.client import Client
from tests.support.cluster import BrokerProcess
from tests.support.grpcurl import grpcurl, grpcurl_path

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path_factory.mktemp("grpcurl")).start()
    try:
        yield process
    finally:
        process.stop()


def test_grpcurl_lists_the_services_through_reflection(broker: BrokerProcess) -> None:
    services = grpcurl("-plaintext", broker.address, "list").split()

    assert {"gpubroker.v1.Broker", "gpubroker.v1.AgentGateway", "grpc.health.v1.Health"} <= set(
        services
    )


def test_grpcurl_describes_the_submit_rpc(broker: BrokerProcess) -> None:
    description = grpcurl("-plaintext", broker.address, "describe", "gpubroker.v1.Broker")

    assert "rpc Submit ( stream .gpubroker.v1.SubmitRequest )" in description


def test_grpcurl_health_check_says_serving(broker: BrokerProcess) -> None:
    reply = json.loads(
        grpcurl(
            "-plaintext", "-d", '{"service": ""}', broker.address, "grpc.health.v1.Health/Check"
        )
    )

    assert reply == {"status": "SERVING"}


def test_grpcurl_lists_the_callers_tasks(broker: BrokerProcess) -> None:
    with Client(broker.address, "key-a") as client:
        handle = client.submit("echo", [torch.ones(1)])

    reply = json.loads(
        grpcurl(
            "-plaintext",
            "-H",
            "authorization: Bearer key-a",
            "-d",
            '{"page_size": 10}',
            broker.address,
            "gpubroker.v1.Broker/ListTasks",
        )
    )

    assert [t["task_id"] for t in reply["tasks"]] == [handle.task_id]
    assert reply["tasks"][0]["state"] == "TASK_STATE_QUEUED"


def test_grpcurl_without_an_api_key_is_unauthenticated(broker: BrokerProcess) -> None:
    done = subprocess.run(
        [grpcurl_path(), "-plaintext", "-d", "{}", broker.address, "gpubroker.v1.Broker/ListTasks"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode != 0
    assert "Unauthenticated" in done.stderr


def test_grpcurl_reads_the_callers_usage(broker: BrokerProcess) -> None:
    reply = json.loads(
        grpcurl(
            "-plaintext",
            "-H",
            "authorization: Bearer key-c",
            "-d",
            "{}",
            broker.address,
            "gpubroker.v1.Broker/GetUsage",
        )
    )

    assert reply["tenant"] == "tenant-c"
    assert reply["cost_usd"] == "0.000000000"
