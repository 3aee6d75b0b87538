"""``python -m gpubroker.broker.certs --out certs/``: a development CA and what it signs.

Writes, into the output directory:

- ``ca.pem`` / ``ca-key.pem``: the CA. Clients and agents trust ``ca.pem``; the broker names
  it as ``--tls-client-ca`` to require client certificates (mutual TLS).
- ``server.pem`` / ``server-key.pem``: the broker's certificate for ``--hosts`` (each a DNS
  name or an IP address in the subject alternative names), for ``--tls-cert`` / ``--tls-key``.
- ``client.pem`` / ``client-key.pem``: a client certificate for mutual TLS, shared by agents
  (``--cert-file`` / ``--key-file``) and clients
  (``gpubroker.protos.transport.client_credentials``).

An existing CA in the directory is kept, so certificates it signed stay valid; the server and
client certificates are made anew. Private keys are ECDSA P-256, written with mode 0600. These
are for development and tests: production brokers get their certificates from a real CA.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_HOSTS", "DevCertificates", "main", "make_dev_certificates"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Names the server certificate covers by default: this machine, by name and loopback IP."""

_CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start a little in the past so a peer whose clock lags still accepts them."""


@dataclass(frozen=True, slots=True)
class DevCertificates:
    """Paths of the PEM files ``make_dev_certificates`` wrote."""

    ca_cert: Path
    """The CA certificate every party trusts."""
    ca_key: Path
    """The CA's private key; only needed to sign more certificates."""
    server_cert: Path
    """The broker's certificate (``--tls-cert``)."""
    server_key: Path
    """The broker's private key (``--tls-key``)."""
    client_cert: Path
    """The client/agent certificate for mutual TLS."""
    client_key: Path
    """The client/agent private key."""


def make_dev_certificates(
    out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 365
) -> DevCertificates:
    """Writes a CA (unless ``out`` holds one), a server and a client certificate into ``out``.

    Raises:
        ValueError: ``hosts`` is empty or ``days`` is not positive.
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    if days < 1:
        raise ValueError(f"certificates must be valid for at least 1 day, not {days}")
    out.mkdir(parents=True, exist_ok=True)
    paths = DevCertificates(
        ca_cert=out / "ca.pem",
        ca_key=out / "ca-key.pem",
        server_cert=out / "server.pem",
        server_key=out / "server-key.pem",
        client_cert=out / "client.pem",
        client_key=out / "client-key.pem",
    )
    validity = timedelta(days=days)
    ca_cert, ca_key = _load_or_make_ca(paths, validity)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _leaf(hosts[0], server_key, ca_cert, ca_key, validity, ExtendedKeyUsageOID.SERVER_AUTH)
    server = server.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
    _write_key(paths.server_key, server_key)
    _write_cert(paths.server_cert, server.sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _leaf(
        "gpubroker-client", client_key, ca_cert, ca_key, validity, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    _write_key(paths.client_key, client_key)
    _write_cert(paths.client_cert, client.sign(ca_key, hashes.SHA256()))
    return paths


def _load_or_make_ca(
    paths: DevCertificates, validity: timedelta
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if paths.ca_cert.exists() and paths.ca_key.exists():
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{paths.ca_key} is not an ECDSA key made by this tool")
        return x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpubroker development CA")])
    now = datetime.now(UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(paths.ca_key, key)
    _write_cert(paths.ca_cert, cert)
    return cert, key


def _leaf(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    validity: timedelta,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    public = key.public_key()
    ca_public = ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only, plus certificate and CRL signing for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 rather than chmod-ed after writing, so the key is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    path.chmod(0o600)  # an existing file keeps its old mode through O_CREAT


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("certs"),
    show_default=True,
    help="Directory to write the PEM files into.",
)
@click.option(
    "--hosts",
    default=",".join(DEFAULT_HOSTS),
    show_default=True,
    help="Comma-separated DNS names and IP addresses the server certificate is valid for.",
)
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)
def main(out: Path, hosts: str, days: int) -> None:
    """Makes a development CA, a broker (server) certificate and a client/agent certificate."""
    names = [host.strip() for host in hosts.split(",") if host.strip()]
    try:
        paths = make_dev_certificates(out, names, days=days)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"CA:     {paths.ca_cert}")
    click.echo(f"server: {paths.server_cert} {paths.server_key} ({', '.join(names)})")
    click.echo(f"client: {paths.client_cert} {paths.client_key}")


if __name__ == "__main__":
    main()
