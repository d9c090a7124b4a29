"""A Hub id with the Hub out of reach: the local cache only, and a clear error at once."""

from __future__ import annotations

import socket
import threading
import time
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
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)


def test_hub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxies(monkeypatch)
    calls: list[tuple[Any, ...]] = []

    def refuse(address: tuple[str, int], timeout: float) -> _Connection:
        calls.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    started = time.monotonic()
    assert models._hub_unreachable(timeout=30)
    assert time.monotonic() - started < 10  # a refusal is a verdict at once, not after the timeout
    assert calls and calls[0][1] in (80, 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the probe would bypass it: no verdict
    assert not models._hub_unreachable()
    _clear_proxies(monkeypatch)
    monkeypatch.setenv("ALL_PROXY", "http://proxy.example:3128")
    assert not models._hub_unreachable()
    monkeypatch.setenv("NO_PROXY", "huggingface.co")  # the proxy does not apply to the Hub: probe directly
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://huggingface.co")
    assert models._hub_unreachable()
    _clear_proxies(monkeypatch)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: _Connection())
    assert not models._hub_unreachable()


def test_hub_probe_keeps_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that hangs (or many addresses each timing out) still gives a verdict in about ``timeout``."""
    _clear_proxies(monkeypatch)
    release = threading.Event()

    def hang(address: tuple[str, int], timeout: float) -> _Connection:
        release.wait(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    started = time.monotonic()
    try:
        assert models._hub_unreachable(timeout=0.2)
        assert time.monotonic() - started < 5  # 0.2 s asked; generous for a loaded machine, far below 30
    finally:
        release.set()


def test_hub_probe_gives_no_verdict_on_a_malformed_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_proxies(monkeypatch)
    for endpoint in ("https://hub.example:notaport", "https://[::1"):
        monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
        assert not models._hub_unreachable()


def test_unreachable_hub_means_cache_only_and_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_unreachable", lambda: True)
    with pytest.raises(
        ModelLoadError, match="the Hub cannot be reached from here, so only the Hugging Face cache"
    ) as err:
        load_base("nmke-patch-tests/no-such-model")
    assert str(err.value).split("cache was tried: ", 1)[1].strip()  # the loader's own reason follows


def test_one_folder_named_three_ways_is_one_model(
    tmp_path, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint keyed the statistics cache and resumable runs on the path as typed (config's
    _name_or_path): `m`, `./m` and `/abs/m` sampled the statistics three times and refused to resume."""
    from conftest import MODEL_FACTORIES, save_tiny

    from nmke_patch.stats import model_fingerprint

    save_tiny(MODEL_FACTORIES["llama"](), tiny_tokenizer, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    prints = {model_fingerprint(load_base(name)[0]) for name in ("m", "./m", str(tmp_path / "m"))}
    assert len(prints) == 1
    other = save_tiny(MODEL_FACTORIES["llama"](seed=1), tiny_tokenizer, tmp_path / "other")
    assert model_fingerprint(load_base(str(other))[0]) not in prints


def test_a_slow_tokenizer_is_refused_with_what_to_do(
    tmp_path, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subjects and answers are found by character offsets, which only fast tokenizers give: a model
    whose tokenizer transformers cannot convert is refused at load, not with a NotImplementedError later."""
    import transformers
    from conftest import MODEL_FACTORIES, save_tiny

    class SlowTokenizer:
        is_fast = False

    save_tiny(MODEL_FACTORIES["llama"](), tiny_tokenizer, tmp_path / "m")
    assert load_base(str(tmp_path / "m"))[1].is_fast
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: SlowTokenizer())
    with pytest.raises(ModelLoadError, match=r"slow \(Python\) tokenizer, SlowTokenizer; .* tokenizer.json"):
        load_base(str(tmp_path / "m"))
