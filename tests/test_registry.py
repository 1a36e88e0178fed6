"""The one registry mechanism: unique names, lookups that name the valid choices, built-ins loaded on first use."""

from __future__ import annotations

import pytest

from megatron_patch.errors import ConfigError
from megatron_patch.registry import Registry


def test_register_get_names_and_errors():
    loaded = []
    registry: Registry[int] = Registry("widget", ConfigError, "valid", load=lambda: loaded.append(registry.add("b", 2)))
    registry.register("a")(1)
    assert not loaded  # nothing looked up yet
    assert registry.get("a") == 1 and registry.names() == ["a", "b"] and loaded == [2]
    assert sorted(registry.values()) == [1, 2] and loaded == [2]  # loaded once
    with pytest.raises(ConfigError, match=r"^in x: unknown widget 'c' \(valid: a, b\)$"):
        registry.get("c", prefix="in x: ")
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        registry.add("a", 3)
