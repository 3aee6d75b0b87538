"""TLS and mutual TLS on the broker's port, with certificates from ``gpubroker.broker.certs``.

The broker runs in-process (in the test's event loop); clients, the agent's own channel code, a
real agent process and the real grpcurl binary connect to it over loopback.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from click.testing import CliRunner
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpubroker.broker.__main__ import main as broker_main
from gpubroker.broker.access.tls import bind_port, is_loopback, server_credentials
from gpubroker.broker.certs import DevCertificates, make_dev_certificates
from gpubroker.broker.certs import main as certs_main
from gpubroker.broker.config import Settings
from gpubroker.broker.errors import ConfigError
from gpubroker.broker.server import BrokerServer
from gpubroker.client import AsyncClient, Client, UnavailableError
from gpubroker.gpu_agent.config import Settings as AgentSettings
from gpubroker.gpu_agent.gateway import GatewayClient, open_channel
from gpubroker.protos import agent_pb2
from gpubroker.protos.transport import client_credentials
from tests.support.cluster import AgentProcess, broker_settings, running_broker
from tests.support.grpcurl import grpcurl, grpcurl_path
from tests.support.waiting import wait_for

KEY = "key-a"
WAIT_S = 20.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    """Certificates from an unrelated CA: what an impostor (or a misconfigured peer) holds."""
    return make_dev_certificates(tmp_path_factory.mktemp("other-certs"))


def _settings(root: Path, **values: object) -> Settings:
    return broker_settings(
        root, **({"api_keys": {KEY: "tenant-a"}, "heartbeat_interval_s": 0.3} | values)
    )


@pytest.fixture
async def tls_broker(tmp_path: Path, certs: DevCertificates) -> AsyncIterator[BrokerServer]:
    settings = _settings(tmp_path, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    async with running_broker(settings) as server:
        yield server


@pytest.fixture
async def mtls_broker(tmp_path: Path, certs: DevCertificates) -> AsyncIterator[BrokerServer]:
    settings = _settings(
        tmp_path,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca_cert,
    )
    async with running_broker(settings) as server:
        yield server


def _address(broker: BrokerServer) -> str:
    return f"127.0.0.1:{broker.port}"


# Certificates


def test_make_certs_writes_a_ca_a_server_and_a_client_certificate(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        certs_main, ["--out", str(tmp_path), "--hosts", "broker.example,10.0.0.5"]
    )

    assert result.exit_code == 0, result.output
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    for key in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    assert (tmp_path / "client.pem").exists()


def test_make_certs_keeps_an_existing_ca(tmp_path: Path) -> None:
    first = make_dev_certificates(tmp_path)
    ca = first.ca_cert.read_bytes()

    make_dev_certificates(tmp_path)

    assert first.ca_cert.read_bytes() == ca


# TLS: server certificate only


async def test_client_submits_and_lists_over_tls(
    tls_broker: BrokerServer, certs: DevCertificates
) -> None:
    def submit_and_list() -> tuple[str, list[str]]:
        credentials = client_credentials(certs.ca_cert)
        with Client(_address(tls_broker), KEY, credentials=credentials) as client:
            handle = client.submit("echo", [torch.ones(2)])
            return handle.task_id, [t.task_id for t in client.list_tasks()]

    task_id, listed = await asyncio.to_thread(submit_and_list)

    assert listed == [task_id]


async def test_plaintext_client_to_the_tls_port_is_unavailable(tls_broker: BrokerServer) -> None:
    async with AsyncClient(_address(tls_broker), KEY) as client:
        with pytest.raises(UnavailableError):
            await client.list_tasks()


async def test_client_trusting_another_ca_is_unavailable(
    tls_broker: BrokerServer, other_certs: DevCertificates
) -> None:
    credentials = client_credentials(other_certs.ca_cert)

    async with AsyncClient(_address(tls_broker), KEY, credentials=credentials) as client:
        with pytest.raises(UnavailableError):
            await client.list_tasks()


# Mutual TLS


@pytest.mark.slow  # a real agent process
async def test_agent_with_the_client_certificate_runs_a_task(
    mtls_broker: BrokerServer, certs: DevCertificates, tmp_path: Path
) -> None:
    agent = AgentProcess(
        tmp_path,
        _address(mtls_broker),
        "mtls-agent",
        slots=1,
        ca_file=certs.ca_cert,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
    ).start()
    credentials = client_credentials(certs.ca_cert, certs.client_cert, certs.client_key)
    try:
        await _wait_for_agents(mtls_broker, agent)

        async with AsyncClient(_address(mtls_broker), KEY, credentials=credentials) as client:
            result = await client.run("echo", [torch.arange(4)], timeout=WAIT_S)
    finally:
        await asyncio.to_thread(agent.stop)

    assert torch.equal(result.output, torch.arange(4))


async def _wait_for_agents(broker: BrokerServer, agent: AgentProcess) -> None:
    def connected() -> bool:
        assert agent.alive, agent.log()
        return len(broker.registry) >= 1

    await wait_for(connected, WAIT_S, "the agent to connect", interval=0.05)


async def _no_messages() -> AsyncIterator[agent_pb2.AgentMessage]:
    await asyncio.Event().wait()  # never sends: the handshake fails before anything would
    yield agent_pb2.AgentMessage()


@pytest.mark.parametrize("holds", ["no certificate", "another CA's certificate"])
async def test_agent_without_a_certificate_from_the_ca_is_refused(
    mtls_broker: BrokerServer,
    certs: DevCertificates,
    other_certs: DevCertificates,
    holds: str,
) -> None:
    issued = {"no certificate": None, "another CA's certificate": other_certs}[holds]
    settings = AgentSettings(
        broker_address=_address(mtls_broker),
        tls=True,
        ca_file=str(certs.ca_cert),
        cert_file=str(issued.client_cert) if issued else None,
        key_file=str(issued.client_key) if issued else None,
    )

    async with open_channel(settings) as channel:
        call = GatewayClient(channel, "impostor", None).connect(_no_messages())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(mtls_broker.registry) == 0


async def test_client_without_a_certificate_is_refused_under_mtls(
    mtls_broker: BrokerServer, certs: DevCertificates
) -> None:
    credentials = client_credentials(certs.ca_cert)

    async with AsyncClient(_address(mtls_broker), KEY, credentials=credentials) as client:
        with pytest.raises(UnavailableError):
            await client.list_tasks()


def test_agent_refuses_a_certificate_without_tls() -> None:
    with pytest.raises(ValueError, match="only sent over TLS"):
        AgentSettings(cert_file="client.pem", key_file="client-key.pem")


# grpcurl


async def test_grpcurl_lists_and_calls_over_tls(
    tls_broker: BrokerServer, certs: DevCertificates
) -> None:
    tls = ["-cacert", str(certs.ca_cert), "-H", f"authorization: Bearer {KEY}"]

    services = await asyncio.to_thread(grpcurl, *tls, _address(tls_broker), "list")
    reply = await asyncio.to_thread(
        grpcurl, *tls, "-d", "{}", _address(tls_broker), "gpubroker.v1.Broker/ListTasks"
    )

    assert "gpubroker.v1.Broker" in services.split()
    assert json.loads(reply) == {}


async def test_grpcurl_with_the_client_certificate_calls_under_mtls(
    mtls_broker: BrokerServer, certs: DevCertificates
) -> None:
    tls = ["-cacert", str(certs.ca_cert), "-H", f"authorization: Bearer {KEY}"]
    tls += ["-cert", str(certs.client_cert), "-key", str(certs.client_key)]

    reply = await asyncio.to_thread(
        grpcurl, *tls, "-d", "{}", _address(mtls_broker), "gpubroker.v1.Broker/ListTasks"
    )

    assert json.loads(reply) == {}


async def test_grpcurl_without_the_ca_does_not_trust_the_broker(tls_broker: BrokerServer) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [grpcurl_path(), "-H", f"authorization: Bearer {KEY}", _address(tls_broker), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode != 0
    assert "certificate" in done.stderr


# Configuration


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", True),
        ("127.3.4.5:0", True),
        ("[::1]:50051", True),
        ("localhost:0", True),
        ("unix:/run/gpubroker.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("broker.example:50051", False),
    ],
)
def test_is_loopback_accepts_only_local_addresses(address: str, expected: bool) -> None:
    assert is_loopback(address) is expected


async def test_plaintext_on_a_public_address_is_refused() -> None:
    server = grpc.aio.server()

    with pytest.raises(ConfigError, match=r"refusing to listen in plaintext on 0\.0\.0\.0:0"):
        bind_port(server, Settings(listen_address="0.0.0.0:0"))

    await server.stop(None)


async def test_plaintext_on_a_public_address_is_allowed_when_explicit(tmp_path: Path) -> None:
    settings = _settings(tmp_path, listen_address="0.0.0.0:0", plaintext=True)
    async with (
        running_broker(settings) as broker,
        grpc.aio.insecure_channel(_address(broker)) as channel,
    ):
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )

    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_refuses_plaintext_on_a_public_address(tmp_path: Path) -> None:
    args = ["--listen", "0.0.0.0:0", "--provider", "none", "--migrate"]
    args += ["--database-url", f"sqlite:///{tmp_path / 'broker.db'}"]
    args += ["--spool-dir", str(tmp_path / "spool")]

    result = CliRunner().invoke(broker_main, args)

    assert result.exit_code == 1
    assert "refusing to listen in plaintext on 0.0.0.0:0" in result.output
    assert "--plaintext" in result.output


def test_a_key_that_does_not_belong_to_the_certificate_is_a_config_error(
    certs: DevCertificates,
) -> None:
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        server_credentials(certs.server_cert, certs.client_key)


def test_a_missing_certificate_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the TLS certificate"):
        server_credentials(tmp_path / "nope.pem", tmp_path / "nope-key.pem")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert_file": Path("s.pem")}, "needs both a certificate"),
        ({"tls_client_ca_file": Path("ca.pem")}, "--tls-client-ca needs a server certificate"),
        (
            {"tls_cert_file": Path("s.pem"), "tls_key_file": Path("k.pem"), "plaintext": True},
            "exclude each other",
        ),
    ],
)
async def test_inconsistent_tls_settings_are_config_errors(
    values: dict[str, object], message: str
) -> None:
    server = grpc.aio.server()

    with pytest.raises(ConfigError, match=message):
        bind_port(server, replace(Settings(), **values))  # type: ignore[arg-type]

    await server.stop(None)


def test_tls_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "GPUBROKER_TLS_CERT": "/etc/gpubroker/server.pem",
            "GPUBROKER_TLS_KEY": "/etc/gpubroker/server-key.pem",
            "GPUBROKER_TLS_CLIENT_CA": "/etc/gpubroker/ca.pem",
            "GPUBROKER_PLAINTEXT": "1",
        }
    )

    assert settings.tls_cert_file == Path("/etc/gpubroker/server.pem")
    assert settings.tls_key_file == Path("/etc/gpubroker/server-key.pem")
    assert settings.tls_client_ca_file == Path("/etc/gpubroker/ca.pem")
    assert settings.plaintext is True


def test_agent_tls_settings_come_from_the_environment() -> None:
    settings = AgentSettings.from_env(
        {
            "GPUBROKER_AGENT_TLS": "1",
            "GPUBROKER_AGENT_CA_FILE": "ca.pem",
            "GPUBROKER_AGENT_CERT_FILE": "client.pem",
            "GPUBROKER_AGENT_KEY_FILE": "client-key.pem",
        }
    )

    assert (settings.tls, settings.ca_file) == (True, "ca.pem")
    assert (settings.cert_file, settings.key_file) == ("client.pem", "client-key.pem")
