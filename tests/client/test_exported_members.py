"""The client's public surface changes only on purpose (httpx's ``test_exported_members``)."""

from __future__ import annotations

import types

from gpubroker import client


def test_all_public_names_are_exported_in_sorted_order() -> None:
    defined = {
        name
        for name, value in vars(client).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # the __future__ import
    }

    assert client.__all__ == sorted(defined)


def test_every_exported_name_is_documented() -> None:
    for name in client.__all__:
        assert getattr(client, name).__doc__, name


def test_the_namespace_root_exports_the_client_sdk_lazily() -> None:
    import gpubroker

    assert gpubroker.__all__ == client.__all__
    for name in gpubroker.__all__:
        assert getattr(gpubroker, name) is getattr(client, name)
