"""Transport security of the broker's port: TLS, optional mutual TLS, or local plaintext.

One port serves both the ``Broker`` service (clients) and ``AgentGateway`` (agents). gRPC
decides about client certificates per port, during the handshake, before it knows which
service a call is for, so the design is per port too:

- ``tls_cert_file`` + ``tls_key_file``: the port speaks TLS with this certificate chain.
  Callers verify the broker; they still authenticate with API keys (clients) and the join
  token (agents), as over plaintext.
- ``tls_client_ca_file`` as well: mutual TLS. *Every* caller, client or agent, must present a
  certificate signed by that CA, or the handshake fails (clients see ``UNAVAILABLE``). API
  keys and the join token still apply on top: the certificate says "may connect", the key
  says which tenant. ``make certs`` issues one client certificate that agents and clients
  both use; a deployment may issue one per machine from the same CA.
- Neither: plaintext, which the broker accepts only on a loopback address (``127.0.0.1``,
  ``::1``, ``localhost``) or a Unix socket, unless ``plaintext`` says it is meant (a private
  network, or TLS terminated by a proxy in front). Anything else refuses to start.

A second, agents-only port with mTLS was considered and left out: both services would still
be reachable on both ports (one ``grpc.aio.Server``), so it would not actually keep
certificate-less agents out.

The local provider starts agents against ``127.0.0.1:<port>`` with the broker's environment,
so with TLS set ``GPUBROKER_AGENT_TLS=1`` and ``GPUBROKER_AGENT_CA_FILE`` (plus
``GPUBROKER_AGENT_CERT_FILE`` / ``GPUBROKER_AGENT_KEY_FILE`` under mTLS) in that environment,
and include ``127.0.0.1`` in the server certificate (``make certs`` does).

All files are read once, when the port is bound: replacing a certificate takes a restart.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import PublicFormat

from gpubroker.broker.config import Settings
from gpubroker.broker.errors import ConfigError

__all__ = ["bind_port", "is_loopback", "server_credentials"]

logger = logging.getLogger(__name__)

_LOCAL_SCHEMES = ("unix:", "unix-abstract:")


def bind_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Binds ``settings.listen_address`` with TLS, mutual TLS or plaintext; returns the port.

    Raises:
        ConfigError: the TLS files are missing, unreadable or do not match, or the broker
            would listen in plaintext on a non-loopback address without ``plaintext``.
    """
    address = settings.listen_address
    credentials = _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(address)
        logger.info("plaintext on %s (port %d)", address, port)
        return port
    port = server.add_secure_port(address, credentials)
    mode = "mutual TLS" if settings.tls_client_ca_file else "TLS"
    logger.info("%s on %s (port %d)", mode, address, port)
    return port


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    cert, key = settings.tls_cert_file, settings.tls_key_file
    client_ca = settings.tls_client_ca_file
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if cert is not None and key is not None:
        if settings.plaintext:
            raise ConfigError("--plaintext and --tls-cert exclude each other: choose one")
        return server_credentials(cert, key, client_ca)
    if client_ca is not None:
        raise ConfigError("--tls-client-ca needs a server certificate (--tls-cert, --tls-key)")
    if not settings.plaintext and not is_loopback(settings.listen_address):
        raise ConfigError(
            f"refusing to listen in plaintext on {settings.listen_address}: give --tls-cert "
            "and --tls-key (`make certs` makes development ones), listen on a loopback address, "
            "or pass --plaintext (GPUBROKER_PLAINTEXT=1) if unencrypted traffic is intended"
        )
    return None


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """Server TLS credentials from PEM files; with ``client_ca_file``, client certs are required.

    Raises:
        ConfigError: a file is missing or not PEM, the key does not belong to the certificate,
            or the certificate has expired.
    """
    chain = _read(cert_file, "TLS certificate")
    key = _read(key_file, "TLS key")
    _check_pair(chain, key, cert_file, key_file)
    roots = None
    if client_ca_file is not None:
        roots = _read(client_ca_file, "client CA")
        _load_certificate(roots, client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` listen address (or a Unix socket) is reachable only locally."""
    if address.startswith(_LOCAL_SCHEMES):
        return True
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _load_certificate(pem: bytes, path: str | Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from exc


def _check_pair(chain: bytes, key_pem: bytes, cert_file: str | Path, key_file: str | Path) -> None:
    # The first certificate of the chain is the broker's own; the rest are intermediates.
    cert = _load_certificate(chain, cert_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_file} is not an unencrypted PEM private key: {exc}") from exc
    der, spki = serialization.Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ConfigError(f"the key {key_file} does not belong to the certificate {cert_file}")
    expires = cert.not_valid_after_utc
    if expires <= datetime.now(UTC):
        raise ConfigError(f"the certificate {cert_file} expired on {expires:%Y-%m-%d %H:%M} UTC")
