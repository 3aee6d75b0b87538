"""The transport settings every end shares: message limits, channel options, bearer metadata."""

from __future__ import annotations

import pytest

from gpubroker.protos.transport import (
    AGENT_CHANNEL_OPTIONS,
    AUTHORIZATION_HEADER,
    CLIENT_CHANNEL_OPTIONS,
    MAX_MESSAGE_BYTES,
    SERVER_OPTIONS,
    bearer_metadata,
    bearer_token,
    client_credentials,
)


@pytest.mark.parametrize("options", [CLIENT_CHANNEL_OPTIONS, AGENT_CHANNEL_OPTIONS, SERVER_OPTIONS])
def test_every_end_allows_the_same_message_size_both_ways(
    options: tuple[tuple[str, int], ...],
) -> None:
    values = dict(options)

    assert values["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
    assert values["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES


def test_the_server_accepts_pings_as_often_as_agents_send_them() -> None:
    agent, server = dict(AGENT_CHANNEL_OPTIONS), dict(SERVER_OPTIONS)

    interval = server["grpc.http2.min_recv_ping_interval_without_data_ms"]

    assert interval <= agent["grpc.keepalive_time_ms"]


def test_a_token_read_back_from_its_metadata_is_the_same_token() -> None:
    metadata = bearer_metadata("gpb_abc_secret")

    assert metadata == ((AUTHORIZATION_HEADER, "Bearer gpb_abc_secret"),)
    assert bearer_token(metadata) == "gpb_abc_secret"


def test_no_token_sends_no_metadata() -> None:
    assert bearer_metadata(None) == ()
    assert bearer_metadata("") == ()


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("Authorization", b"bearer  tok "),), "tok"),
        ((("user-agent", "x"), ("authorization", "Bearer t2")), "t2"),
        ((("authorization", "Basic dXNlcg=="),), None),
        ((("authorization", "Bearer "),), None),
        (None, None),
    ],
)
def test_the_token_is_read_case_insensitively_and_only_from_a_bearer_entry(
    metadata: tuple[tuple[str, str | bytes], ...] | None, token: str | None
) -> None:
    assert bearer_token(metadata) == token


def test_a_client_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(ValueError, match="give both cert_file and key_file"):
        client_credentials(None, cert_file="client.pem")
