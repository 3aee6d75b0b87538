"""``GceSettings`` refuses what cannot go into a VM's startup script; the deploy example loads."""

from __future__ import annotations

from typing import Any

import pytest

from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.scaling.loop import load_scaling_config
from gpubroker.broker.scaling.providers.gce import GceSettings, GpuOffering
from tests.fakes.compute import FakeCompute
from tests.support.gce import make_settings
from tests.support.paths import REPO_ROOT


def test_extra_packages_from_a_toml_list_become_a_tuple(fake: FakeCompute) -> None:
    settings = make_settings(fake, agent_extra_packages=["a==1", "b @ https://example.com/b.whl"])

    assert settings.agent_extra_packages == ("a==1", "b @ https://example.com/b.whl")


def test_extra_packages_default_to_an_empty_tuple(fake: FakeCompute) -> None:
    assert make_settings(fake).agent_extra_packages == ()


@pytest.mark.parametrize(
    "overrides",
    [
        {"agent_package": ""},
        {"agent_package": "--index-url=https://evil.example.com/simple"},
        {"agent_extra_packages": "gpubroker-example-workloads==0.1.0"},
        {"agent_extra_packages": [""]},
        {"agent_extra_packages": ["   "]},
        {"agent_extra_packages": ["--extra-index-url", "https://evil.example.com/simple"]},
        {"agent_extra_packages": ["-e ."]},
        {"agent_extra_packages": ["ok==1", "two\nlines==1"]},
        {"agent_extra_packages": [3]},
    ],
    ids=[
        "no-agent-package",
        "agent-package-option",
        "a-string-not-a-list",
        "empty",
        "blank",
        "option",
        "editable",
        "newline",
        "not-a-string",
    ],
)
def test_settings_refuse_package_lists_that_are_not_requirements(
    fake: FakeCompute, overrides: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"agent_package|agent_extra_packages"):
        make_settings(fake, **overrides)


def test_the_deploy_example_builds_settings_with_its_extra_packages() -> None:
    config = load_scaling_config(
        REPO_ROOT / "deploy" / "scaling-gce.toml", "gce", PriceCatalog.load()
    )
    # The same conversions as the broker's server makes of the [gce] table.
    table = dict(config.provider_table)
    table["zones"] = tuple(table["zones"])
    table["offerings"] = {k: GpuOffering(**v) for k, v in table["offerings"].items()}

    settings = GceSettings(**table)

    assert settings.agent_package.startswith("gpubroker[agent] @ ")
    assert settings.agent_extra_packages == (
        "gpubroker-example-workloads @ https://example.com/wheels/"
        "gpubroker_example_workloads-0.1.0-py3-none-any.whl",
    )
