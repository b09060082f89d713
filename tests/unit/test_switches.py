"""The ``PDSERVE_*`` environment switches: one registry, strict values, every read through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pdserve.common import switches
from pdserve.common.errors import ConfigError

PACKAGE = Path(switches.__file__).parents[1]


def test_every_switch_read_goes_through_the_registry() -> None:
    """No module reads a ``PDSERVE_*`` variable itself (but the tiny model's cache directory), and every
    registered switch is read somewhere."""
    pattern = re.compile(r"environ(?:\.get\(|\[)\s*[\"'](PDSERVE_\w+)")
    direct, sources = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        sources.append(text)
        if path.name != "switches.py":
            direct += [(path.name, name) for name in pattern.findall(text) if name != "PDSERVE_CACHE_DIR"]
    assert direct == []
    names = {s.name for s in switches.ALL}
    assert len(names) == len(switches.ALL)
    for attribute in dir(switches):
        value = getattr(switches, attribute)
        if isinstance(value, switches.Switch):
            assert value in switches.ALL, attribute
            assert any(f"switches.{attribute}" in text for text in sources), f"{attribute} is never read"


def test_values_are_checked_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    switch = switches.BALANCED_DECODE_SPLITS
    monkeypatch.delenv(switch.name, raising=False)
    assert switch.flag() is True and switches.effective()[switch.name] == "1"
    monkeypatch.setenv(switch.name, "0")
    assert switch.flag() is False and switches.effective()[switch.name] == "0"
    monkeypatch.setenv(switch.name, "yes")
    with pytest.raises(ConfigError, match="PDSERVE_BALANCED_DECODE_SPLITS: must be 0 or 1, got 'yes'"):
        switch.flag()
    size = switches.KV_MAX_MESSAGE_BYTES
    monkeypatch.setenv(size.name, "1e6")
    assert size.number() == 1e6
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(size.name, bad)
        with pytest.raises(ConfigError, match="PDSERVE_KV_MAX_MESSAGE_BYTES: must be"):
            size.number()
