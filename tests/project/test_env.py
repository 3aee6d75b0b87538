"""Boolean environment variables read the same way in every process."""

from __future__ import annotations

import pytest

from gpubroker.broker.config import Settings as BrokerSettings
from gpubroker.env import env_flag
from gpubroker.gpu_agent.config import Settings as AgentSettings


@pytest.mark.parametrize("raw", ["1", "true", "YES", " on "])
def test_true_words_are_true(raw: str) -> None:
    assert env_flag({"X": raw}, "X") is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "OFF"])
def test_false_words_are_false(raw: str) -> None:
    assert env_flag({"X": raw}, "X", default=True) is False


@pytest.mark.parametrize("environ", [{}, {"X": ""}, {"X": "  "}])
def test_an_unset_or_empty_variable_keeps_the_default(environ: dict[str, str]) -> None:
    assert env_flag(environ, "X") is False
    assert env_flag(environ, "X", default=True) is True


def test_any_other_value_is_refused_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="X must be true or false, got 'maybe'"):
        env_flag({"X": "maybe"}, "X")


def test_the_broker_and_the_agent_read_their_flags_alike() -> None:
    environ = {
        "GPUBROKER_MIGRATE": "yes",
        "GPUBROKER_BILLING": "off",
        "GPUBROKER_PLAINTEXT": "1",
        "GPUBROKER_AGENT_TLS": "on",
    }

    broker = BrokerSettings.from_env(environ)
    agent = AgentSettings.from_env(environ)

    assert (broker.migrate, broker.billing, broker.plaintext) == (True, False, True)
    assert agent.tls is True
    assert BrokerSettings.from_env({}).billing is True
