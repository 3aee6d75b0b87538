"""The client's public surface changes only on purpose (httpx's ``test_exported_members``)."""

from __future__ import annotations

import types

import client


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
