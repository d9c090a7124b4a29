"""Key statistics ``C0 = E[k k^T]`` over preserved text, the null-space projector, and their disk cache.

Preserved text is the user's (``stats_corpus``: text files) or, by default, text sampled from the model
itself (works offline). Statistics are cached under ``$NMKE_PATCH_HOME/stats/<model fingerprint>/`` per
corpus, token count and layer; files are written to a temporary name and renamed, so two processes
computing the same statistics at once never leave a corrupt file (the last rename wins, both complete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from .architectures import ArchitectureSpec, decoder_layers, spec_for_model
from .dataset_corpus import DatasetCorpus, is_dataset
from .delta import all_finite
from .errors import ModelLoadError
from .jsonio import read_user_text
from .lengths import context_length
from .models import tensor_fingerprint
from .paths import aside_name, home, remove_leftovers
from .sampling import end_token_ids, sample_continuations
from .tokens import last_text_id, leading_specials, text_ids
from .tracing import capture, stop_after

logger = logging.getLogger(__name__)

StatsProgress = Callable[[int, int], None]
"""Called as ``progress(tokens_done, tokens_total)`` while preservation text is sampled."""

SAMPLE_STARTS = (
    "The",
    "In",
    "A",
    "It",
    "This",
    "He",
    "She",
    "They",
    "We",
    "When",
    "After",
    "One",
    "Many",
    "There",
    "Some",
    "Most",
)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's config and every parameter's bytes (cached on the model object). Where the
    model was loaded from (the config's ``_name_or_path``) is left out: one folder given as ``m``, ``./m``
    or its absolute path is one model, with one statistics cache and one resumable run."""
    cached = model.__dict__.get("_nmke_fingerprint")
    if cached:
        return cached
    config = cast(Any, model).config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    fp = digest.hexdigest()
    model.__dict__["_nmke_fingerprint"] = fp
    return fp


def sample_text(
    model: PreTrainedModel,
    tokenizer: Any,
    tokens: int,
    seed: int,
    *,
    seq_len: int = 128,
    batch: int = 32,
    prefix: str = "",
    progress: StatsProgress | None = None,
) -> list[list[int]]:
    """About ``tokens`` tokens of text sampled from the model (top-k 40, seeded), as token-id rows.

    Each row starts with the tokenizer's leading special tokens (a BOS, where it puts one in front of every
    text, as in the prompts edited) and one of :data:`SAMPLE_STARTS`; ``prefix`` (e.g. an encyclopedia
    header) is text the model continues from, left out of the rows. The draws come from a CPU generator
    (:mod:`nmke_patch.sampling`): the same text on any device. ``progress(done, total)`` is called with
    the tokens drawn so far after every step.
    """
    limit = context_length(model) or seq_len
    lead = leading_specials(tokenizer)  # a BOS: the text is sampled, and read, as the model reads prompts
    prefix_ids = text_ids(tokenizer, prefix) if prefix else lead
    seq_len = min(seq_len, limit - len(prefix_ids))  # the prefix takes positions too
    if seq_len < 2:
        raise ModelLoadError(f"stats_prefix takes {len(prefix_ids)} of the model's {limit} positions")
    generator = torch.Generator().manual_seed(seed)
    banned = end_token_ids(model, tokenizer)
    rows: list[list[int]] = []
    while (done := sum(len(r) for r in rows)) < tokens:
        starts = [
            last_text_id(tokenizer, SAMPLE_STARTS[(len(rows) + i) % len(SAMPLE_STARTS)]) for i in range(batch)
        ]

        def report(drawn: int, before: int = done) -> None:  # each row: its start token and `drawn` more
            if progress is not None:
                progress(min(tokens, before + batch * (1 + drawn)), tokens)

        rows.extend(
            sample_continuations(
                model,
                starts,
                seq_len - 1,
                top_k=40,
                generator=generator,
                banned=banned,
                prefix_ids=prefix_ids,
                on_step=report if progress is not None else None,
            )
        )
    return [[*lead, *r] for r in rows] if lead else rows


def _corpus_error(path: str, exc: OSError | None) -> ModelLoadError:
    reason = "empty entry" if exc is None else exc.strerror or str(exc)
    return ModelLoadError(
        f"cannot read stats corpus file {path!r}: {reason}; stats_corpus is one text file or several "
        f"joined with os.pathsep ({os.pathsep!r} here)"
    )


def corpus_files(corpus: str) -> list[Path]:
    """The files of a ``stats_corpus`` value (joined with ``os.pathsep``), each checked to open for reading.

    Raises:
        ModelLoadError: naming the first entry that is empty, missing, a directory or unreadable.
    """
    files = []
    for path in corpus.split(os.pathsep):
        if not path:
            raise _corpus_error(path, None)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise _corpus_error(path, exc) from exc
        files.append(Path(path))
    return files


def check_corpus(corpus: str | None) -> None:
    """Refuse a ``stats_corpus`` (``None``: model-sampled text) that :func:`corpus_files` or, for a
    ``dataset:`` value, :meth:`DatasetCorpus.parse` refuses; cheap, so callers can run it before loading a
    model."""
    if corpus is not None and is_dataset(corpus):
        DatasetCorpus.parse(corpus)
    elif corpus is not None:
        corpus_files(corpus)


def _file_texts(paths: Sequence[str]) -> Iterable[str]:
    for path in paths:
        try:
            yield read_user_text(path, ModelLoadError)
        except OSError as exc:
            raise _corpus_error(str(path), exc) from exc


def _joined(texts: Iterable[str], size: int = 1 << 16) -> Iterable[str]:
    """``texts`` without blank ones, joined by blank lines into pieces of at least ``size`` characters."""
    piece: list[str] = []
    length = 0
    for text in texts:
        if text.strip():
            piece.append(text.strip())
            length += len(piece[-1])
            if length >= size:
                yield "\n\n".join(piece)
                piece, length = [], 0
    if piece:
        yield "\n\n".join(piece)


def corpus_rows(tokenizer: Any, corpus: str, tokens: int, *, seq_len: int = 128) -> list[list[int]]:
    """Token rows of up to ``tokens`` tokens (split into ``seq_len`` chunks) from a ``stats_corpus`` value:
    the user's text files (each tokenized in pieces of about 1 MB, as far as needed), or a ``dataset:`` (:mod:`nmke_patch.dataset_corpus`), whose
    non-blank rows are joined by blank lines into one stream (rows are often single lines); read only as far
    as needed."""
    if is_dataset(corpus):
        texts = _joined(DatasetCorpus.parse(corpus).texts())
    else:
        texts = _file_texts(corpus.split(os.pathsep))
    rows: list[list[int]] = []
    total = 0
    lead = leading_specials(tokenizer)  # every row starts as the model's prompts do (a BOS)
    width = max(1, seq_len - len(lead))
    for text in texts:
        for piece in _pieces(text):
            ids = text_ids(tokenizer, piece)
            ids = ids[len(lead) :] if lead and ids[: len(lead)] == lead else ids
            for s in range(0, len(ids), width):
                rows.append([*lead, *ids[s : s + width]])
                total += len(rows[-1])
                if total >= tokens:
                    return rows
    if not rows:
        raise ModelLoadError(f"stats corpus {corpus!r} holds no text")
    _warn_short_corpus(corpus, total, tokens)
    return rows


def _warn_short_corpus(corpus: str, total: int, tokens: int) -> None:
    """Say that the statistics come from fewer tokens than asked (when computed, and on every cache hit)."""
    logger.warning(
        "stats corpus %r holds only %d of the %d tokens asked for (stats_tokens): the key statistics come "
        "from those; add text for statistics that represent the model's use",
        corpus,
        total,
        tokens,
    )


def _pieces(text: str, size: int = 1 << 20) -> Iterable[str]:
    """``text`` in pieces of at most ``size`` characters, cut at a line end (else a space) where there is
    one, so a huge file is tokenized only as far as needed (a text up to ``size`` is one piece)."""
    start = 0
    while len(text) - start > size:
        end = text.rfind("\n", start, start + size)
        if end <= start:
            end = text.rfind(" ", start, start + size)
        end = start + size if end <= start else end + 1
        yield text[start:end]
        start = end
    yield text[start:]


def _key_pass(
    model: PreTrainedModel, spec: ArchitectureSpec, rows: Sequence[list[int]], layers: Sequence[int]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One right-padded forward pass over ``rows``, stopped after the last of ``layers``: the keys ``k<l>``
    ``[B, T, d_ff]`` (inputs of each layer's MLP output projection) and the padding mask ``[B, T]``, both on
    the model's device."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    paths = {f"k{l}": f"{spec.layers}.{l}.{spec.mlp_out}" for l in layers}
    with capture(model, inputs=paths) as seen, stop_after(decoder_layers(model, spec)[max(layers)]):
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return dict(seen), mask.to(device)


@torch.no_grad()
def key_second_moments(
    model: PreTrainedModel,
    spec: ArchitectureSpec,
    rows: Iterable[list[int]],
    layers: Sequence[int],
    *,
    batch: int = 16,
) -> dict[int, torch.Tensor]:
    """``C0[l] = mean over tokens of k k^T`` (float32, ``[d_ff, d_ff]``) for each layer in ``layers``."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    rows = list(rows)
    for s in range(0, len(rows), batch):
        seen, mask = _key_pass(model, spec, rows[s : s + batch], layers)
        keep = mask.bool()
        for l in layers:
            k = seen[f"k{l}"][keep].float()
            sums[l] = sums.get(l, 0) + k.T @ k  # type: ignore[assignment, operator]
        count += int(keep.sum())
    return {l: (sums[l] / count).cpu() for l in layers}


@torch.no_grad()
def first_token_moments(
    model: PreTrainedModel,
    spec: ArchitectureSpec,
    rows: Iterable[list[int]],
    layers: Sequence[int],
    *,
    batch: int = 512,
) -> dict[int, torch.Tensor]:
    """``E[k k^T]`` of the key at a text's first position, the token drawn as often as it occurs in ``rows``.

    A first token's key depends on that token alone (nothing precedes it) and is unlike the same token's
    key later in a text; every later token attends to it, so a change there reaches the whole text. Keys
    of each distinct token are computed once, from one-token inputs, and weighted by their counts.
    """
    device = next(model.parameters()).device
    counts = Counter(t for r in rows for t in r)
    ids = torch.tensor(sorted(counts), dtype=torch.long)
    weight = torch.tensor([counts[int(t)] for t in ids], dtype=torch.float32)
    paths = {f"k{l}": f"{spec.layers}.{l}.{spec.mlp_out}" for l in layers}
    sums: dict[int, torch.Tensor] = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch, None].to(device)
        w = weight[s : s + batch, None].to(device)
        with capture(model, inputs=paths) as seen, stop_after(decoder_layers(model, spec)[max(layers)]):
            model(input_ids=chunk, attention_mask=torch.ones_like(chunk))
        for l in layers:
            k = seen[f"k{l}"][:, 0].float()
            sums[l] = sums.get(l, 0) + (k * w).T @ k  # type: ignore[assignment, operator]
    total = float(weight.sum())
    return {l: (sums[l] / total).cpu() for l in layers}


@torch.no_grad()
def key_bank(
    model: PreTrainedModel,
    spec: ArchitectureSpec,
    rows: Iterable[list[int]],
    layers: Sequence[int],
    *,
    size: int,
    seed: int = 0,
    batch: int = 16,
) -> dict[int, torch.Tensor]:
    """``[size, d_ff]`` keys per layer at token positions drawn at random from ``rows`` (never a text's first
    position, whose key depends on its token alone), float16: the preserved text's keys themselves, for
    finding those nearest an edited subject's."""
    device = next(model.parameters()).device
    rows = [r for r in rows if len(r) > 1]
    positions = [(i, p) for i, r in enumerate(rows) for p in range(1, len(r))]
    pick = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))[:size]
    wanted: dict[int, list[int]] = {}
    for j in sorted(pick.tolist()):
        i, p = positions[j]
        wanted.setdefault(i, []).append(p)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    chosen = sorted(wanted)
    for s in range(0, len(chosen), batch):
        chunk = chosen[s : s + batch]
        seen, _ = _key_pass(model, spec, [rows[i] for i in chunk], layers)
        at_row = torch.tensor([b for b, i in enumerate(chunk) for _ in wanted[i]])
        at_pos = torch.tensor([p for i in chunk for p in wanted[i]])
        for l in layers:
            out[l].append(seen[f"k{l}"][at_row.to(device), at_pos.to(device)].to("cpu", torch.float16))
    return {l: torch.cat(v) for l, v in out.items()}


@dataclass(frozen=True)
class StatsSource:
    """Which preserved text the statistics come from."""

    corpus: str | None
    tokens: int
    seed: int
    prefix: str = ""  # model-sampled text: what the model continues (not counted itself)

    def __post_init__(self) -> None:
        check_corpus(self.corpus)  # before anything is sampled, hashed or computed

    @classmethod
    def of(cls, config: Any) -> StatsSource:
        """The source an :class:`~nmke_patch.methods.nmke.config.EditConfig` asks for."""
        return cls(config.stats_corpus, config.stats_tokens, config.seed, config.stats_prefix)

    @property
    def key(self) -> str:
        if self.corpus is None:
            style = f"-p{hashlib.sha256(self.prefix.encode()).hexdigest()[:12]}" if self.prefix else ""
            return f"model-sampled-s{self.seed}-{self.tokens}{style}"
        if is_dataset(self.corpus):
            return f"dataset-{DatasetCorpus.parse(self.corpus).key}-{self.tokens}"
        digest = hashlib.sha256()
        for file in corpus_files(self.corpus):
            try:
                digest.update(file.read_bytes())
            except OSError as exc:  # removed since the check
                raise _corpus_error(str(file), exc) from exc
        # "p1": files tokenized in ~1 MB pieces (_pieces); statistics cached when a big file was tokenized
        # whole differ at the cuts, so they are not reused.
        return f"corpus-p1-{digest.hexdigest()[:16]}-{self.tokens}"


def load_or_compute_c0(
    model: PreTrainedModel,
    tokenizer: Any,
    layers: Sequence[int],
    source: StatsSource,
    *,
    cache: bool = True,
    progress: StatsProgress | None = None,
    text: PreservedText | None = None,
) -> dict[int, torch.Tensor]:
    """``C0`` for each layer, from the disk cache when present (a second ``create`` reuses it). ``text``: the
    preserved text to use when something must be computed (default: drawn here, with ``progress``)."""
    text = text or PreservedText(model, tokenizer, source, progress)
    return _load_or_compute(model, layers, source, "layer", key_second_moments, text, cache=cache)


def load_or_compute_bank(
    model: PreTrainedModel,
    tokenizer: Any,
    layers: Sequence[int],
    source: StatsSource,
    size: int,
    *,
    cache: bool = True,
    progress: StatsProgress | None = None,
    text: PreservedText | None = None,
) -> dict[int, torch.Tensor]:
    """:func:`key_bank` of ``size`` keys per layer over the same preserved text, cached like ``C0``."""
    text = text or PreservedText(model, tokenizer, source, progress)

    def compute(
        model: PreTrainedModel, spec: ArchitectureSpec, rows: list[list[int]], layers: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        return key_bank(model, spec, rows, layers, size=size, seed=source.seed)

    return _load_or_compute(model, layers, source, f"bank{size}-", compute, text, cache=cache)


@dataclass
class KeyStatistics:
    """What an editor needs of the preserved text: ``C0`` and, when its settings use them, the first-position
    statistics and the key bank."""

    c0: dict[int, torch.Tensor]
    c_first: dict[int, torch.Tensor] | None = None
    bank: dict[int, torch.Tensor] | None = None


def load_statistics(
    model: PreTrainedModel,
    tokenizer: Any,
    layers: Sequence[int],
    configs: Sequence[Any],
    *,
    progress: StatsProgress | None = None,
) -> KeyStatistics:
    """The statistics for editors with ``configs`` (EditConfigs sharing one preserved text), each computed
    once and cached; the optional ones only when some config uses them. ``progress`` follows the sampling
    of preservation text, when there is any to sample (nothing is cached yet)."""
    source = StatsSource.of(configs[0])
    text = PreservedText(model, tokenizer, source, progress)  # drawn once, for whichever kind needs it
    resolved = [c.resolved() for c in configs]
    banks = [c.bank_size for c in resolved if c.contrast_bank > 0]
    return KeyStatistics(
        c0=load_or_compute_c0(model, tokenizer, layers, source, text=text),
        c_first=(
            _load_or_compute(  # first-position statistics over the same text, cached like C0
                model, layers, source, "first", first_token_moments, text, cache=True
            )
            if any(c.first_token_weight > 0 for c in resolved)
            else None
        ),
        bank=(
            load_or_compute_bank(model, tokenizer, layers, source, max(banks), text=text) if banks else None
        ),
    )


class PreservedText:
    """The preserved text of ``source`` as token rows: sampled from the model (with ``progress``) or read
    from the corpus on first use, then kept, so the kinds of statistics computed together share one draw."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        source: StatsSource,
        progress: StatsProgress | None = None,
    ) -> None:
        self.model, self.tokenizer, self.source, self.progress = model, tokenizer, source, progress
        self._rows: list[list[int]] | None = None

    def rows(self) -> list[list[int]]:
        if self._rows is None:
            src = self.source
            self._rows = (
                sample_text(
                    self.model,
                    self.tokenizer,
                    src.tokens,
                    src.seed,
                    prefix=src.prefix,
                    progress=self.progress,
                )
                if src.corpus is None
                else corpus_rows(
                    self.tokenizer,
                    src.corpus,
                    src.tokens,
                    seq_len=min(128, context_length(self.model) or 128),
                )
            )
        return self._rows


def _warn_if_short(file: Path, source: StatsSource) -> None:
    """On a cache hit, the short-corpus warning the computing run gave (its token count is recorded)."""
    if source.corpus is None:
        return
    with contextlib.suppress(Exception), safe_open(str(file), framework="pt") as fh:
        recorded = (fh.metadata() or {}).get("tokens", "")
        if recorded.isdigit() and int(recorded) < source.tokens:
            _warn_short_corpus(source.corpus, int(recorded), source.tokens)


def _cached_statistics(file: Path, d_ff: int) -> torch.Tensor | None:
    """The statistics cached in ``file``, or None (with a warning) where it cannot be trusted: unreadable,
    not the tensor it was written with (the fingerprint it records), not ``[n, d_ff]``, or not finite. A
    damaged cache file is computed again, never used."""
    try:
        with safe_open(str(file), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get("fingerprint")
            tensor = fh.get_tensor("c0")
    except Exception:  # unreadable in any way
        logger.warning("ignoring unreadable statistics cache %s", file)
        return None
    if recorded != tensor_fingerprint(tensor):
        problem = "it is not the tensor it was written with (its fingerprint differs)"
    elif tensor.dim() != 2 or tensor.shape[1] != d_ff:
        problem = f"its shape {list(tensor.shape)} is not [n, {d_ff}]"
    elif not all_finite(tensor):
        problem = "it is not finite"
    else:
        return tensor
    logger.warning("ignoring the statistics cache %s: %s; computing it again", file, problem)
    return None


def _load_or_compute(
    model: PreTrainedModel,
    layers: Sequence[int],
    source: StatsSource,
    kind: str,
    compute: Callable[
        [PreTrainedModel, ArchitectureSpec, list[list[int]], Sequence[int]], dict[int, torch.Tensor]
    ],
    text: PreservedText,
    *,
    cache: bool,
) -> dict[int, torch.Tensor]:
    spec = spec_for_model(model)
    key = source.key  # hashes a corpus's files: once per call
    if leading_specials(text.tokenizer):  # rows open with the BOS: not the statistics cached before they did
        key += "-bos"
    folder = home() / "stats" / model_fingerprint(model)[:24] / key
    result: dict[int, torch.Tensor] = {}
    missing = []
    params = dict(model.named_parameters())
    for l in layers:
        file = folder / f"{kind}{l}.safetensors"
        if cache and file.is_file():
            cached = _cached_statistics(file, int(params[spec.weight_name(l)].shape[spec.neuron_axis]))
            if cached is not None:
                result[l] = cached
                continue
        missing.append(l)
    if layers and not missing:  # all from the cache: say what computing them said, once
        _warn_if_short(folder / f"{kind}{layers[0]}.safetensors", source)
    if missing:
        logger.info("computing %s key statistics for layers %s from %s", kind, missing, key)
        computed = compute(model, spec, text.rows(), missing)
        drawn = str(sum(len(r) for r in text.rows()))
        folder.mkdir(parents=True, exist_ok=True)
        for l, c0 in computed.items():
            result[l] = c0
            if cache:
                remove_leftovers(folder, f".{kind}{l}", suffix=".tmp")  # of writers killed before
                tmp = folder / f"{aside_name(f'.{kind}{l}')}.tmp"
                c0 = c0.contiguous()
                metadata = {"layer": str(l), "source": key, "fingerprint": tensor_fingerprint(c0)}
                metadata["tokens"] = drawn  # a short corpus is said again on reuse
                save_file({"c0": c0}, tmp, metadata=metadata)
                os.replace(tmp, folder / f"{kind}{l}.safetensors")
    return result


def nullspace_basis(c0: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal basis ``[D, r]`` of the low-energy subspace of ``c0``.

    Keeps the eigenvectors with the smallest eigenvalues whose eigenvalues sum to at most ``energy``
    times the trace (at least one), a rule relative to the statistics that transfers between models.
    """
    evals, evecs = torch.linalg.eigh(c0.double())
    evals = evals.clamp_min(0)
    share = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-30)
    keep = max(1, int((share <= energy).sum()))
    return evecs[:, :keep].to(c0.dtype)
