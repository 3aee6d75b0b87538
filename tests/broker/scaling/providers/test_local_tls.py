"""A broker that serves TLS starts its ``local`` agents with TLS: the README's TLS example, with
the default provider, runs work (it used to start agents that dialled plaintext and never
joined)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpubroker.broker.certs import DevCertificates, make_dev_certificates
from gpubroker.broker.scaling.providers.local import LocalSettings, _tls_args
from gpubroker.client import AsyncClient
from gpubroker.protos.transport import client_credentials
from tests.support.cluster import broker_settings, running_broker

SCALING = """
[policy]
interval_s = 0.2
max_instances = 1
slots_per_instance = 1
default_boot_s = 1.0
scale_up_cooldown_s = 0.2

[local]
slots = 1
stop_grace_s = 10.0
ca_file = "{ca}"
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


def test_a_plaintext_broker_gives_its_agents_no_tls_flags(tmp_path: Path) -> None:
    settings = LocalSettings(broker_address="127.0.0.1:1", state_dir=tmp_path, ca_file="ca.pem")

    assert _tls_args(settings) == []


def test_a_tls_broker_gives_its_agents_tls_and_absolute_file_paths(tmp_path: Path) -> None:
    settings = LocalSettings(
        broker_address="127.0.0.1:1",
        state_dir=tmp_path,
        tls=True,
        ca_file="certs/ca.pem",
        cert_file="/etc/c.pem",
        key_file="/etc/k.pem",
    )

    args = _tls_args(settings)

    assert args == [
        "--tls",
        "--ca-file",
        str(Path("certs/ca.pem").resolve()),
        "--cert-file",
        "/etc/c.pem",
        "--key-file",
        "/etc/k.pem",
    ]


@pytest.mark.slow  # the autoscaler starts a real agent process
async def test_a_tls_broker_with_the_local_provider_runs_work(
    tmp_path: Path, certs: DevCertificates
) -> None:
    config = tmp_path / "scaling.toml"
    config.write_text(SCALING.format(ca=certs.ca_cert))
    settings = broker_settings(
        tmp_path,
        provider="local",
        scaling_config=config,
        api_keys={"key-a": "tenant-a"},
        join_token="join-me",
        heartbeat_interval_s=0.3,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
    )

    async with running_broker(settings) as broker:
        credentials = client_credentials(str(certs.ca_cert))
        async with AsyncClient(
            f"localhost:{broker.port}", "key-a", credentials=credentials
        ) as client:
            result = await client.run("add", [torch.ones(2), torch.ones(2)], timeout=60)

    assert result.output.equal(torch.full((2,), 2.0))
    (log,) = (tmp_path / "agents").glob("local-*.log")
    assert "connected to 127.0.0.1" in log.read_text()
