"""TLS credentials for a client (or an agent) of a broker that serves TLS."""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["client_credentials"]


def client_credentials(
    ca_file: str | Path | None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials for a client or agent: trust ``ca_file`` (system roots when None),
    and present ``cert_file`` / ``key_file`` to a broker that requires client certificates.

    Raises:
        ValueError: only one of ``cert_file`` and ``key_file`` is given.
        OSError: a file cannot be read.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file is not None else None,
        private_key=Path(key_file).read_bytes() if key_file is not None else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
    )
