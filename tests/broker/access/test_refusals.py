"""Refused agent joins: one WARNING per host per minute, with the count held back."""

from __future__ import annotations

import logging

import pytest

from gpubroker.broker.access.refusals import RefusalLog, peer_host


def test_a_host_is_logged_once_a_minute_and_the_next_line_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "gpubroker.broker.access")

    logged = [refusals.refused("ipv4:10.0.0.5:4000 ", "bad token")]
    for port in range(4001, 4011):  # a new port per retry: still the same host
        now[0] += 5
        logged.append(refusals.refused(f"ipv4:10.0.0.5:{port}", "bad token"))
    logged.append(refusals.refused("ipv6:[fd00::7]:5000", "bad token"))
    now[0] = 61
    logged.append(refusals.refused("ipv4:10.0.0.5:4100", "bad token"))

    assert logged == [True] + [False] * 10 + [True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[1] == "refused an agent join from fd00::7: bad token"
    assert messages[2].endswith("(10 more refused in the last minute)")


def test_peer_hosts_drop_the_port() -> None:
    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
