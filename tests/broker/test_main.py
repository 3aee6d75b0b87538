"""``python -m gpubroker.broker`` refuses a bad setting in one line, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts a Python process


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("GPUBROKER_MIGRATE", "maybe", "GPUBROKER_MIGRATE must be true or false, got 'maybe'"),
        ("GPUBROKER_PLAINTEXT", "sometimes", "GPUBROKER_PLAINTEXT"),
    ],
)
def test_a_setting_that_does_not_parse_is_a_usage_error(
    variable: str, value: str, named: str
) -> None:
    env = {**os.environ, variable: value}

    done = subprocess.run(
        [sys.executable, "-m", "gpubroker.broker", "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert named in done.stderr
    assert "Traceback" not in done.stderr
