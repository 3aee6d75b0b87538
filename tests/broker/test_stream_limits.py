"""Stream limits: read from the environment, and turned into the server's gRPC options."""

from __future__ import annotations

import pytest

from gpubroker.broker.config import Settings, StreamLimits
from gpubroker.protos.transport import SERVER_OPTIONS, server_options


def test_stream_limits_are_read_from_the_environment() -> None:
    environ = {
        "GPUBROKER_UPLOAD_IDLE_TIMEOUT_S": "5",
        "GPUBROKER_UPLOAD_MIN_RATE_KIB": "0.5",
        "GPUBROKER_UPLOAD_RATE_WINDOW_S": "10",
        "GPUBROKER_MAX_CALLS_PER_TENANT": "7",
        "GPUBROKER_MAX_STREAMS_PER_CONNECTION": "9",
        "GPUBROKER_CONNECTION_IDLE_S": "60",
        "GPUBROKER_CONNECTION_MAX_AGE_S": "120",
        "GPUBROKER_CONNECTION_AGE_GRACE_S": "30",
        "GPUBROKER_MAX_METADATA_BYTES": "4096",
    }

    limits = Settings.from_env(environ).streams

    assert limits == StreamLimits(5.0, 512, 10.0, 7, 9, 60.0, 120.0, 30.0, 4096)
    assert Settings.from_env({}).streams == StreamLimits()


@pytest.mark.parametrize(
    "bad",
    [
        {"upload_idle_timeout_s": 0},
        {"upload_min_rate_bytes_per_s": -1},
        {"max_calls_per_tenant": 0},
        {"max_metadata_bytes": 100},
    ],
)
def test_nonsense_stream_limits_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StreamLimits(**bad)  # type: ignore[arg-type]


def test_server_options_bound_connections_and_keep_the_fixed_options() -> None:
    options = dict(
        server_options(
            max_connection_idle_ms=1,
            max_connection_age_ms=2,
            max_connection_age_grace_ms=None,
            max_concurrent_streams=3,
            max_metadata_bytes=4096,
        )
    )

    assert dict(SERVER_OPTIONS).items() <= options.items()
    assert options["grpc.max_connection_idle_ms"] == 1
    assert options["grpc.max_connection_age_ms"] == 2
    assert "grpc.max_connection_age_grace_ms" not in options  # calls run on until they end
    assert options["grpc.max_concurrent_streams"] == 3
    assert options["grpc.max_metadata_size"] == 4096
