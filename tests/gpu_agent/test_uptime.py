"""The agent's process uptime, from the kernel's records (a scratch /proc here) or its clock."""

from __future__ import annotations

import os
from pathlib import Path

from gpubroker.gpu_agent.uptime import process_uptime_s


def test_uptime_is_the_machine_s_age_less_the_process_start(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "self").mkdir()
    # The command name may hold spaces and parentheses; field 22 counts from after it.
    fields = ["S", *["0"] * 18, str(250 * ticks), "0"]
    (tmp_path / "self" / "stat").write_text(f"1234 (python (x) y) {' '.join(fields)}\n")
    (tmp_path / "uptime").write_text("300.00 1000.00\n")

    assert process_uptime_s(tmp_path) == 50.0


def test_without_proc_it_counts_from_the_agent_s_import(tmp_path: Path) -> None:
    first = process_uptime_s(tmp_path / "missing")
    second = process_uptime_s(tmp_path / "missing")

    assert 0.0 <= first <= second


def test_this_process_has_run_for_a_while_but_not_for_ever() -> None:
    uptime = process_uptime_s()

    assert 0.0 < uptime < 24 * 3600
