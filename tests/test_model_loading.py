"""A Hub id with the Hub out of reach: the local cache only, and a clear error at once."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from huggingface_hub import constants as hub_constants

from nmke_patch import models
from nmke_patch.errors import ModelLoadError
from nmke_patch.models import load_base


class _Connection:
    def close(self) -> None:
        pass


def _clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_hub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxies(monkeypatch)
    calls: list[tuple[Any, ...]] = []

    def refuse(address: tuple[str, int], timeout: float) -> _Connection:
        calls.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert models._hub_unreachable()
    assert calls and calls[0][1] in (80, 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the probe would bypass it: no verdict
    assert not models._hub_unreachable()
    _clear_proxies(monkeypatch)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: _Connection())
    assert not models._hub_unreachable()


def test_unreachable_hub_means_cache_only_and_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_unreachable", lambda: True)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache, and the Hub cannot be reached"):
        load_base("nmke-patch-tests/no-such-model")
