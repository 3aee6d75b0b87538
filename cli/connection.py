"""How the client commands reach a broker: ``--broker``, ``--api-key`` and TLS options.

Each option may come from its environment variable instead, so that a shell (or a CI job)
sets them once: ``GPUBROKER_ADDRESS``, ``GPUBROKER_API_KEY``, ``GPUBROKER_TLS``,
``GPUBROKER_CA_FILE``, ``GPUBROKER_CERT_FILE`` and ``GPUBROKER_KEY_FILE``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from gpubroker.client import Client
from gpubroker.protos.transport import bearer_metadata, client_credentials

__all__ = ["DEFAULT_ADDRESS", "Connection", "connection_options"]

DEFAULT_ADDRESS = "localhost:50051"
"""Where the client commands look for a broker unless told: the broker's own default port."""

_F = TypeVar("_F", bound=Callable[..., Any])

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@dataclass(frozen=True, slots=True)
class Connection:
    """The broker to call and how."""

    address: str
    api_key: str | None
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None

    def client(self) -> Client:
        """A blocking client of the broker (close it, or use it as a context manager).

        Raises:
            click.UsageError: a client certificate without its key, or the other way round.
        """
        return Client(self.address, self.api_key, credentials=self._credentials())

    def channel(self) -> grpc.Channel:
        """A channel to the broker, for the calls the client SDK does not make.

        Raises:
            click.UsageError: as for ``client``.
        """
        credentials = self._credentials()
        if credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata presenting the API key."""
        return bearer_metadata(self.api_key)

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.ca_file or self.cert_file):
            return None
        try:
            return client_credentials(self.ca_file, self.cert_file, self.key_file)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc


def connection_options(command: _F) -> _F:
    """Adds the connection options to a command, handed to it as ``connection``."""

    @click.option(
        "--broker",
        "address",
        metavar="HOST:PORT",
        envvar="GPUBROKER_ADDRESS",
        show_envvar=True,
        default=DEFAULT_ADDRESS,
        help="The broker to call.",
    )
    @click.option(
        "--api-key",
        envvar="GPUBROKER_API_KEY",
        show_envvar=True,
        help="Your API key; none for a broker in open mode.",
    )
    @click.option(
        "--tls/--no-tls",
        envvar="GPUBROKER_TLS",
        show_envvar=True,
        default=False,
        help="Dial the broker over TLS (implied by --ca-file or --cert-file).",
    )
    @click.option(
        "--ca-file",
        type=_FILE,
        envvar="GPUBROKER_CA_FILE",
        show_envvar=True,
        help="PEM CA that signed the broker's certificate [default: the system's roots].",
    )
    @click.option(
        "--cert-file",
        type=_FILE,
        envvar="GPUBROKER_CERT_FILE",
        show_envvar=True,
        help="PEM client certificate, for a broker that requires one (mutual TLS).",
    )
    @click.option(
        "--key-file",
        type=_FILE,
        envvar="GPUBROKER_KEY_FILE",
        show_envvar=True,
        help="PEM private key of --cert-file.",
    )
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        address: str,
        api_key: str | None,
        tls: bool,
        ca_file: Path | None,
        cert_file: Path | None,
        key_file: Path | None,
        **kwargs: Any,
    ) -> Any:
        connection = Connection(address, api_key or None, tls, ca_file, cert_file, key_file)
        return command(*args, connection=connection, **kwargs)

    return wrapper  # type: ignore[return-value]
