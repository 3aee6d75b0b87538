"""Boot phases from the recorded moments of a machine's boot, pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gpubroker.broker.scaling.boots import BootPhase, BootTimeline

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_full_boot_splits_into_provision_install_and_connect() -> None:
    timeline = BootTimeline(created=T0, running=at(20), agent_started=at(200), connected=at(212))

    assert timeline.phases() == {
        BootPhase.PROVISION: 20.0,
        BootPhase.INSTALL: 180.0,
        BootPhase.CONNECT: 12.0,
        BootPhase.TOTAL: 212.0,
    }


def test_an_agent_that_reports_no_start_gives_provision_and_total_only() -> None:
    timeline = BootTimeline(created=T0, running=at(20), connected=at(212))

    assert timeline.phases() == {BootPhase.PROVISION: 20.0, BootPhase.TOTAL: 212.0}


def test_running_seen_after_the_agent_started_counts_from_the_agent_start() -> None:
    # A local agent starts within the broker's tick: RUNNING is seen after its hello.
    timeline = BootTimeline(created=T0, running=at(3), agent_started=at(1), connected=at(2))

    assert timeline.phases() == {
        BootPhase.PROVISION: 1.0,
        BootPhase.INSTALL: 0.0,
        BootPhase.CONNECT: 1.0,
        BootPhase.TOTAL: 2.0,
    }


def test_an_agent_start_outside_the_boot_is_clamped_into_it() -> None:
    skewed = BootTimeline(created=T0, running=at(10), agent_started=at(-5), connected=at(30))
    late = BootTimeline(created=T0, running=at(10), agent_started=at(40), connected=at(30))

    assert skewed.phases()[BootPhase.CONNECT] == 30.0
    assert late.phases()[BootPhase.INSTALL] == 20.0
    assert late.phases()[BootPhase.CONNECT] == 0.0


def test_a_machine_still_booting_has_only_its_provision_phase() -> None:
    assert BootTimeline(created=T0, running=at(25)).phases() == {BootPhase.PROVISION: 25.0}
    assert BootTimeline(created=T0).phases() == {}
