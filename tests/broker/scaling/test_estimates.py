"""Boot estimates per GPU type: what a launch of a type should expect to wait."""

from __future__ import annotations

import pytest

from gpubroker.broker.scaling.estimates import BootEstimates


def test_before_any_boot_every_type_expects_the_default() -> None:
    boots = BootEstimates(default_s=90.0, smoothing=0.5)

    assert boots.overall_s == 90.0
    assert boots.for_types(("nvidia-h100-80gb", "nvidia-l4")) == 90.0
    assert boots.known_types() == {}


def test_each_type_learns_its_own_boots_and_the_overall_estimate_all_of_them() -> None:
    boots = BootEstimates(default_s=90.0, smoothing=0.5)

    boots.observe(300.0, "nvidia-h100-80gb")  # type: 0.5 x 300 + 0.5 x 90 (overall so far)
    boots.observe(60.0, "nvidia-l4")  # type: 0.5 x 60 + 0.5 x 195 (overall so far)
    boots.observe(100.0, "nvidia-l4")  # type: 0.5 x 100 + 0.5 x 127.5

    assert boots.for_types(("nvidia-h100-80gb",)) == 195.0
    assert boots.for_types(("nvidia-l4",)) == 113.75
    assert boots.overall_s == 0.5 * 100.0 + 0.5 * (0.5 * 60.0 + 0.5 * 195.0)


def test_a_launch_expects_the_boot_of_the_type_the_provider_tries_first() -> None:
    boots = BootEstimates(default_s=90.0, smoothing=1.0)
    boots.observe(300.0, "nvidia-h100-80gb")
    boots.observe(60.0, "nvidia-l4")

    assert boots.for_types(("nvidia-l4", "nvidia-h100-80gb")) == 60.0
    assert boots.for_types(("nvidia-h100-80gb", "nvidia-l4")) == 300.0
    # A type with no boots yet: what all types taught, not the configured guess.
    assert boots.for_types(("nvidia-a100-80gb", "nvidia-l4")) == boots.overall_s == 60.0
    assert boots.for_types(()) == 60.0


def test_a_boot_of_no_known_type_moves_only_the_overall_estimate() -> None:
    boots = BootEstimates(default_s=90.0, smoothing=0.5)

    boots.observe(190.0)

    assert boots.overall_s == 140.0
    assert boots.known_types() == {}


def test_seeding_folds_recorded_boots_in_order_as_if_observed() -> None:
    recorded = [("nvidia-l4", 100.0), ("nvidia-l4", 40.0), ("nvidia-t4", 200.0)]
    seeded, observed = BootEstimates(90.0, 0.3), BootEstimates(90.0, 0.3)

    assert seeded.seed(recorded) == 3
    for gpu_type, seconds in recorded:
        observed.observe(seconds, gpu_type)

    assert seeded.known_types() == observed.known_types()
    assert seeded.overall_s == observed.overall_s


@pytest.mark.parametrize(
    ("default_s", "smoothing", "match"),
    [(-1.0, 0.5, "default"), (90.0, 0.0, "smoothing"), (90.0, 1.5, "smoothing")],
)
def test_bad_settings_are_refused(default_s: float, smoothing: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BootEstimates(default_s, smoothing)


def test_a_negative_boot_is_refused_and_changes_nothing() -> None:
    boots = BootEstimates(90.0, 0.5)

    with pytest.raises(ValueError, match="-1"):
        boots.observe(-1.0, "nvidia-l4")

    assert boots.known_types() == {}
    assert boots.overall_s == 90.0
