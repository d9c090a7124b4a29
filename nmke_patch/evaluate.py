"""Evaluation of a (patched) model: edit metrics, model health and the footprint of patches.

Metrics follow CounterFact (Meng et al., 2022, "Locating and Editing Factual Associations in GPT":
efficacy, paraphrase and neighbourhood scores and magnitudes, n-gram-entropy fluency) and ZsRE as used by
MEND/MEMIT/AlphaEdit (teacher-forced token accuracy). Every metric is defined in ``docs/evaluation.md``.

:func:`evaluate` measures one model as it is; :func:`compare` turns a base and a patched result into
drift figures (neighbourhood agreement, perplexity drift, unrelated-fact retention) and the footprint of
the patches; :func:`evaluate_pair` does both for a base model and a list of patches.

All teacher-forced scoring goes through :func:`score_targets`: rows are right-padded, every (prompt,
target) pair is read at its own positions, token rows shared between pairs (identical, or one a prefix of
another) run once, openings shared by several rows run once (the rows continue from their KV cache), and
only target positions are unembedded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import cache_argument, returned_cache
from .delta import TensorDelta
from .errors import InvalidRequestError, PatchMismatchError
from .jsonio import load_json_text, read_user_text
from .lengths import check_facts_fit, check_fits, context_length, windows
from .methods.nmke.prompts import encode
from .patch import Patch
from .requests import EditRequest, Neighbor, RequestsLike, as_requests
from .sources import PatchSource, resolve_patches
from .stack import PatchStack, check_lineage

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Called with the name of each evaluation stage as it starts."""

FLUENCY_PROMPTS = (
    "The city is known for",
    "In the morning, the team",
    "My favourite book is about",
    "The history of the region",
    "Scientists recently found that",
    "The best way to learn a language is",
    "During the winter months,",
    "The old house at the end of the street",
)
"""Prompts that top up the fluency prompts when there are fewer requests than generations."""

_WORD = re.compile(r"\w+|[^\w\s]")
EVAL_VERSION = 2
"""Bumped whenever a metric's computation changes (invalidates cached base results)."""

METRICS: dict[str, str] = {
    "efficacy": "efficacy: P(new) > P(true)",
    "efficacy_margin": "  margin",
    "generalization": "generalization (paraphrases)",
    "generalization_margin": "  margin",
    "specificity": "specificity: P(own) > P(new)",
    "specificity_margin": "  margin",
    "p_new": "mean P(new)",
    "zsre_accuracy": "ZsRE token accuracy",
    "zsre_paraphrase_accuracy": "  on paraphrases",
    "zsre_neighborhood_accuracy": "  neighbours' answers",
    "zsre_neighborhood_agreement": "  agree with base",
    "fluency": "fluency (n-gram entropy)",
    "fluency_change": "  fluency change",
    "perplexity": "held-out perplexity",
    "perplexity_drift_pct": "  perplexity drift %",
    "unrelated_accuracy": "unrelated facts answered",
    "unrelated_retention": "  retention",
}
"""Short labels of every metric, in display order (definitions: docs/evaluation.md)."""


# -- packaged data -----------------------------------------------------------------------------------------


def load_heldout() -> list[str]:
    """The held-out paragraphs shipped with the package (``nmke_patch/_data/heldout.txt``, one per line)."""
    text = resources.files("nmke_patch").joinpath("_data/heldout.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_unrelated(path: str | None = None) -> list[Neighbor]:
    """Unrelated facts (``{"prompt", "target"}`` JSONL): ``path``, or the packaged set (empty if absent)."""
    if path is None:
        source = resources.files("nmke_patch").joinpath("_data/unrelated_facts.jsonl")
        if not source.is_file():
            logger.warning("the packaged unrelated-fact set is missing; retention is not measured")
            return []
        text = source.read_text(encoding="utf-8")
    else:
        text = read_user_text(path, InvalidRequestError)
    facts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        record = load_json_text(
            line, f"{path or 'unrelated_facts.jsonl'}: line {lineno}", InvalidRequestError
        )
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) and record[k].strip() for k in ("prompt", "target")
        ):
            raise InvalidRequestError(
                f"{path or 'unrelated_facts.jsonl'}: line {lineno} needs non-empty 'prompt' and 'target' strings"
            )
        facts.append(Neighbor(record["prompt"], record["target"]))
    if path is not None and not facts:
        raise InvalidRequestError(f"{path} holds no facts (one JSON object per line: prompt, target)")
    return facts


# -- teacher-forced scoring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """Teacher-forced scores of (prompt, target) pairs, in input order."""

    logprob: torch.Tensor
    """``[N]`` float64: log P(target | prompt), summed over the target's tokens."""
    token_accuracy: torch.Tensor
    """``[N]`` float64: share of target tokens that are the argmax at their position."""
    argmax: list[list[int]]
    """Per pair, the argmax token at each target position."""

    @property
    def prob(self) -> torch.Tensor:
        return self.logprob.exp()

    @property
    def exact(self) -> torch.Tensor:
        """``[N]`` bool: every target token is the argmax (greedy decoding yields the target)."""
        return self.token_accuracy >= 1.0


def _carriers(feeds: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Distinct token rows to run (longest first) and, per feed, the row that contains it as a prefix."""
    order = sorted(range(len(feeds)), key=lambda i: -len(feeds[i]))
    by_prefix: dict[tuple[int, ...], int] = {}
    rows: list[list[int]] = []
    assign = [0] * len(feeds)
    for i in order:
        key = tuple(feeds[i])
        row = by_prefix.get(key)
        if row is None:
            row = len(rows)
            rows.append(feeds[i])
            for k in range(1, len(key) + 1):
                by_prefix.setdefault(key[:k], row)
        assign[i] = row
    return rows, assign


def _stem_lengths(rows: list[list[int]]) -> list[int]:
    """Per row, the length of the longest proper prefix it shares with another row (0 if none)."""
    counts = Counter(tuple(r[:k]) for r in rows for k in range(1, len(r)))
    return [next((k for k in range(len(r) - 1, 0, -1) if counts[tuple(r[:k])] >= 2), 0) for r in rows]


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, W]`` token ids and attention mask."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, : len(row)] = torch.tensor(list(row))
            mask[b, : len(row)] = 1
    return ids, mask


def _buckets(items: list[int], width: Callable[[int], int], max_batch_tokens: int) -> list[list[int]]:
    """``items`` sorted by ``width`` (longest first) and cut into batches of at most ``max_batch_tokens``
    padded tokens (a single item may exceed it): few forward passes, little padding."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(items, key=lambda i: -width(i)):
        if cur and (len(cur) + 1) * width(cur[0]) > max_batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    return [*out, cur] if cur else out


def _backbone(model: nn.Module) -> Any:
    """The transformer without its LM head (``model.base_model``): final hidden states, no logits."""
    return model.base_model


def _head(model: nn.Module) -> Any:
    """The LM head (output embeddings): hidden states to logits."""
    get: Any = model.get_output_embeddings
    return get()


@dataclass
class _Stem:
    """A shared prefix, run once: its final hidden states and its keys/values per layer."""

    hidden: torch.Tensor  # [L, d]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, L, head_dim]


def _run_stems(
    model: nn.Module, stems: list[tuple[int, ...]], max_batch_tokens: int, pad: int
) -> list[_Stem] | None:
    """Run each stem once (right-padded batches); None when the model's KV cache cannot be read back."""
    device = next(model.parameters()).device
    done: dict[int, _Stem] = {}
    for batch in _buckets(list(range(len(stems))), lambda i: len(stems[i]), max_batch_tokens):
        ids, mask = _pad([stems[i] for i in batch], pad)
        result = _backbone(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
        layers = getattr(returned_cache(result), "layers", None)
        if not layers or not all(hasattr(l, "keys") and hasattr(l, "values") for l in layers):
            return None
        for b, i in enumerate(batch):
            n = len(stems[i])
            done[i] = _Stem(
                result.last_hidden_state[b, :n], [(l.keys[b, :, :n], l.values[b, :, :n]) for l in layers]
            )
    return [done[i] for i in range(len(stems))]


def _continue_from_stems(
    model: nn.Module, stems: list[_Stem], suffixes: torch.Tensor, suffix_mask: torch.Tensor
) -> torch.Tensor:
    """Final hidden states ``[R, Lu, d]`` of right-padded ``suffixes`` ``[R, Lu]`` fed after ``stems[b]``.

    The stems' keys/values are right-padded into one KV cache; the attention mask hides the padding and
    each row's positions continue from its own stem's length.
    """
    from transformers import DynamicCache

    device = suffixes.device
    rows, lu = suffixes.shape
    lengths = [s.hidden.shape[0] for s in stems]
    width = max(lengths)
    mask = torch.zeros((rows, width + lu), dtype=torch.long, device=device)
    mask[:, width:] = suffix_mask
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    cache = DynamicCache()
    for layer in range(len(stems[0].kv)):
        k0, v0 = stems[0].kv[layer]
        keys = k0.new_zeros((rows, k0.shape[0], width, k0.shape[2]))
        values = v0.new_zeros((rows, v0.shape[0], width, v0.shape[2]))
        for b, s in enumerate(stems):
            k, v = s.kv[layer]
            keys[b, :, : k.shape[1]] = k
            values[b, :, : v.shape[1]] = v
        cache.update(keys, values, layer)
    base = _backbone(model)
    cache_arg = cache_argument(base)
    positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(lu, device=device)[None, :]
    return base(
        input_ids=suffixes, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: cache}
    ).last_hidden_state


def _row_states(
    model: nn.Module, rows: list[list[int]], *, share_prefixes: bool, max_batch_tokens: int, pad: int
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Batches of ``(row, final hidden states [len(row), d])`` (rows right-padded, similar lengths together).

    With ``share_prefixes`` the longest proper prefix each row shares with another row (a template's
    opening, a prompt scored with several targets) runs once, and the rows continue from its KV cache.
    """
    device = next(model.parameters()).device
    stem_len = _stem_lengths(rows) if share_prefixes else [0] * len(rows)
    keys = sorted({tuple(rows[r][: stem_len[r]]) for r in range(len(rows)) if stem_len[r]})
    stems = _run_stems(model, keys, max_batch_tokens, pad) if keys else []
    if stems is None:  # this model's cache cannot be read back: no sharing
        stem_len, stems = [0] * len(rows), []
    index = {k: i for i, k in enumerate(keys)}
    plain = [r for r in range(len(rows)) if not stem_len[r]]
    for batch in _buckets(plain, lambda r: len(rows[r]), max_batch_tokens):
        ids, mask = _pad([rows[r] for r in batch], pad)
        hidden = _backbone(model)(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).last_hidden_state
        yield [(r, hidden[b, : len(rows[r])]) for b, r in enumerate(batch)]
    shared = [r for r in range(len(rows)) if stem_len[r]]
    for batch in _buckets(shared, lambda r: len(rows[r]) - stem_len[r], max_batch_tokens):
        mine = [stems[index[tuple(rows[r][: stem_len[r]])]] for r in batch]
        ids, mask = _pad([rows[r][stem_len[r] :] for r in batch], pad)
        hidden = _continue_from_stems(model, mine, ids.to(device), mask.to(device))
        yield [
            (r, torch.cat([s.hidden, hidden[b, : len(rows[r]) - stem_len[r]]]))
            for b, (r, s) in enumerate(zip(batch, mine, strict=True))
        ]


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    max_batch_tokens: int = 512,
    share_prefixes: bool = True,
) -> Scores:
    """Score ``targets[i]`` after ``prompts[i]`` with teacher forcing (``" " + target`` is appended).

    Each distinct token row runs once (a pair whose row is a prefix of another's is read from the longer
    row: causal attention makes the states identical); rows are right-padded into batches of similar
    lengths of at most ``max_batch_tokens`` tokens; with ``share_prefixes`` shared openings run once
    (:func:`_row_states`); each pair is read at its own positions and only those are unembedded.
    """
    n = len(prompts)
    if n == 0:
        return Scores(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [])
    enc = encode(tokenizer, list(prompts), [None] * n, list(targets))
    lengths = enc.attention_mask.sum(dim=1).tolist()
    feeds = [enc.input_ids[i, : lengths[i]].tolist() for i in range(n)]
    rows, assign = _carriers(feeds)
    users: list[list[int]] = [[] for _ in rows]
    for i, row in enumerate(assign):
        users[row].append(i)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    unembed = _head(model)
    logprob = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.float64)
    argmax: list[list[int]] = [[] for _ in range(n)]
    states = _row_states(
        model, rows, share_prefixes=share_prefixes, max_batch_tokens=max_batch_tokens, pad=pad
    )
    for batch in states:
        pair, vectors, tok = [], [], []
        for r, h in batch:
            for i in users[r]:
                first = int(enc.last_pos[i])
                m = len(enc.target_ids[i])
                pair += [i] * m
                vectors.append(h[first : first + m])
                tok += enc.target_ids[i]
        logits = unembed(torch.cat(vectors)).float()
        tokens = torch.tensor(tok, device=device)
        lp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1).double().cpu()
        best = logits.argmax(dim=-1).cpu()
        index = torch.tensor(pair)
        logprob.index_add_(0, index, lp)
        correct.index_add_(0, index, (best == tokens.cpu()).double())
        for i, t in zip(pair, best.tolist(), strict=True):
            argmax[i].append(t)
    counts = torch.tensor([max(1, len(t)) for t in enc.target_ids], dtype=torch.float64)
    return Scores(logprob, correct / counts, argmax)


# -- model health ------------------------------------------------------------------------------------------


def ngram_entropy(
    tokens: Sequence[Any], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Weighted n-gram entropy in bits (ROME's fluency): ``mean_n(w_n * H(n-gram frequencies))``.

    ``tokens`` are any hashable items (words here). A sequence too short for an n-gram contributes 0.
    """
    terms = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def words(text: str) -> list[str]:
    """Word and punctuation tokens (a dependency-free stand-in for ``nltk.word_tokenize``)."""
    return _WORD.findall(text)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batch, KV cache; end-of-text does not stop). Within
    the model's context length: a prompt is cut from the left to leave room for the new tokens."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(p).input_ids for p in prompts]
    limit = context_length(model)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - 1)
        encoded = [e[-(limit - max_new_tokens) :] for e in encoded]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    cache_arg = cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    generated = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(dim=-1)
        generated.append(nxt)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        past = returned_cache(out)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: past},
        )
    tokens = torch.stack(generated, dim=1).cpu()
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def _check_lengths(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], unrelated: Sequence[Neighbor]
) -> None:
    """Every scored prompt, with its answer, fits the model's context (one error naming it, else)."""
    limit = context_length(model)
    check_fits(requests, tokenizer, limit)
    check_facts_fit(unrelated, tokenizer, limit, "unrelated facts")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    paragraphs: Sequence[str],
    *,
    max_tokens: int | None = None,
    max_batch_tokens: int = 2048,
) -> tuple[float, int]:
    """``exp(mean NLL)`` over every predicted token of ``paragraphs`` (each its own sequence, cut into
    windows of the model's context length where longer).

    Whole paragraphs are taken in order until ``max_tokens`` tokens are reached (the last one is cut).

    Returns:
        ``(perplexity, number of predicted tokens)``.
    """
    rows: list[list[int]] = []
    total = 0
    limit = context_length(model)
    for text in paragraphs:
        ids = list(tokenizer(text).input_ids)
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if len(ids) >= 2:
            rows.extend(w for w in windows(ids, limit) if len(w) >= 2)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not rows:
        return float("nan"), 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    unembed = _head(model)
    nll, count = 0.0, 0
    for batch in _buckets(list(range(len(rows))), lambda r: len(rows[r]), max_batch_tokens):
        padded, mask = _pad([rows[r] for r in batch], pad)
        padded, mask = padded.to(device), mask.to(device)
        hidden = _backbone(model)(input_ids=padded, attention_mask=mask, use_cache=False).last_hidden_state
        valid = mask[:, 1:].bool()
        h = hidden[:, :-1][valid]
        labels = padded[:, 1:][valid]
        for s in range(0, h.shape[0], 512):  # bound the [positions, vocab] logits
            logits = unembed(h[s : s + 512]).float()
            nll += float(torch.nn.functional.cross_entropy(logits, labels[s : s + 512], reduction="sum"))
        count += int(valid.sum())
    return math.exp(nll / count), count


# -- evaluation --------------------------------------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _neighbor_key(n: Neighbor) -> str:
    return f"{n.prompt}\t{n.target}"


def _check_counts(
    generations: int = 8,
    generation_tokens: int = 40,
    heldout_tokens: int | None = 1024,
    max_batch_tokens: int = 512,
) -> None:
    """Refuse a count of :func:`evaluate` that is not an integer of at least its least value."""
    counts = {
        "generations": (generations, 0),
        "generation_tokens": (generation_tokens, 1),
        "max_batch_tokens": (max_batch_tokens, 1),
    }
    if heldout_tokens is not None:
        counts["heldout_tokens"] = (heldout_tokens, 1)
    for name, (value, least) in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidRequestError(f"{name} must be an integer >= {least} (got {value!r})")


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    requests: RequestsLike,
    *,
    heldout_text: str | Sequence[str] | None = None,
    unrelated: Sequence[Neighbor] | None = None,
    generations: int = 8,
    generation_tokens: int = 40,
    heldout_tokens: int | None = 1024,
    max_batch_tokens: int = 512,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` as it is (whatever patches are applied) on ``requests``.

    Args:
        requests: the facts: a facts file path, one record, or a list of records (:func:`as_requests`).
        heldout_text: text for perplexity (a string with one paragraph per line, or paragraphs);
            ``None`` = the packaged held-out paragraphs; empty = skip perplexity.
        unrelated: facts for retention; ``None`` = the packaged unrelated-fact set; empty = skip.
        generations: number of greedy free generations for fluency (0 = skip), each
            ``generation_tokens`` long; prompts are the first requests' edit prompts, topped up with
            :data:`FLUENCY_PROMPTS`.
        heldout_tokens: cap on the held-out tokens scored (``None`` = all).
        max_batch_tokens: padded tokens per forward pass when scoring facts (held-out paragraphs are
            batched up to four times as many).
        progress: called with the name of each stage.

    Returns:
        ``{"metrics": {name: value or None}, "counts": {...}, "details": {...}, "seconds": {...}}``;
        ``details`` holds what :func:`compare` needs (argmax tokens of neighbourhood answers, which
        unrelated facts are answered, perplexity) and the generations. Definitions: docs/evaluation.md.
    """
    _check_counts(generations, generation_tokens, heldout_tokens, max_batch_tokens)
    requests = as_requests(requests)
    say = progress or (lambda _stage: None)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    unrelated = load_unrelated() if unrelated is None else list(unrelated)
    _check_lengths(model, tokenizer, requests, unrelated)
    if heldout_text is None:
        paragraphs = load_heldout()
    elif isinstance(heldout_text, str):
        paragraphs = [p for p in heldout_text.splitlines() if p.strip()]
    else:
        paragraphs = list(heldout_text)

    # One scoring pass over every (prompt, target) pair the metrics need.
    say(f"scoring {len(requests)} facts and {len(unrelated)} unrelated facts")
    prompts: list[str] = []
    targets: list[str] = []
    seen: dict[tuple[str, str], int] = {}

    def add(prompt: str, target: str) -> int:
        if (prompt, target) not in seen:
            seen[(prompt, target)] = len(prompts)
            prompts.append(prompt)
            targets.append(target)
        return seen[(prompt, target)]

    plan = []
    for r in requests:
        texts = [r.text, *r.paraphrases]
        new = [add(t, r.target_new) for t in texts]
        true = [add(t, r.target_true) for t in texts] if r.target_true else None
        own = [add(n.prompt, n.target) for n in r.neighborhood]
        against = [add(n.prompt, r.target_new) for n in r.neighborhood]
        plan.append((new, true, own, against))
    unrelated_idx = [add(u.prompt, u.target) for u in unrelated]
    scores = score_targets(model, tokenizer, prompts, targets, max_batch_tokens=max_batch_tokens)
    p = scores.prob.tolist()
    lp = scores.logprob.tolist()  # the comparisons: probabilities of long targets underflow to 0 alike
    acc = scores.token_accuracy.tolist()
    seconds["scoring"] = time.perf_counter() - t0

    per: dict[str, list[float | None]] = {
        k: []
        for k in (
            "efficacy",
            "efficacy_margin",
            "generalization",
            "generalization_margin",
            "specificity",
            "specificity_margin",
            "p_new",
            "zsre_accuracy",
            "zsre_paraphrase_accuracy",
            "zsre_neighborhood_accuracy",
        )
    }
    argmax: dict[str, list[int]] = {}
    neighbor_keys: list[list[str]] = []
    for r, (new, true, own, against) in zip(requests, plan, strict=True):
        per["p_new"].append(p[new[0]])
        per["zsre_accuracy"].append(acc[new[0]])
        per["zsre_paraphrase_accuracy"].append(_mean(acc[i] for i in new[1:]))
        if true is not None:
            per["efficacy"].append(float(lp[new[0]] > lp[true[0]]))
            per["efficacy_margin"].append(p[new[0]] - p[true[0]])
            pairs = list(zip(new[1:], true[1:], strict=True))
            per["generalization"].append(_mean(float(lp[a] > lp[b]) for a, b in pairs))
            per["generalization_margin"].append(_mean(p[a] - p[b] for a, b in pairs))
        nb = [
            (a, b) for n, a, b in zip(r.neighborhood, own, against, strict=True) if n.target != r.target_new
        ]
        per["specificity"].append(_mean(float(lp[a] > lp[b]) for a, b in nb))
        per["specificity_margin"].append(_mean(p[a] - p[b] for a, b in nb))
        per["zsre_neighborhood_accuracy"].append(_mean(acc[a] for a in own))
        keys = [_neighbor_key(n) for n in r.neighborhood]
        for key, i in zip(keys, own, strict=True):
            argmax[key] = scores.argmax[i]
        neighbor_keys.append(keys)
    metrics: dict[str, float | None] = {k: _mean(v) for k, v in per.items()}
    answered = {
        _neighbor_key(u): bool(scores.exact[i]) for u, i in zip(unrelated, unrelated_idx, strict=True)
    }
    metrics["unrelated_accuracy"] = _mean(float(v) for v in answered.values())

    t1 = time.perf_counter()
    texts_out: list[str] = []
    if generations > 0:
        say(f"generating {generations} x {generation_tokens} tokens")
        gen_prompts = [r.text for r in requests[:generations]]
        gen_prompts += list(FLUENCY_PROMPTS[: max(0, generations - len(gen_prompts))])
        texts_out = greedy_generate(model, tokenizer, gen_prompts, generation_tokens)
        metrics["fluency"] = _mean(ngram_entropy(words(t)) for t in texts_out)
    else:
        metrics["fluency"] = None
    t2 = time.perf_counter()
    seconds["generation"] = t2 - t1

    say("perplexity on held-out text")
    ppl, ppl_tokens = (
        perplexity(
            model, tokenizer, paragraphs, max_tokens=heldout_tokens, max_batch_tokens=4 * max_batch_tokens
        )
        if paragraphs
        else (float("nan"), 0)
    )
    metrics["perplexity"] = None if math.isnan(ppl) else ppl
    seconds["perplexity"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    return {
        "metrics": metrics,
        "counts": {
            "requests": len(requests),
            "with_target_true": sum(1 for r in requests if r.target_true),
            "paraphrases": sum(len(r.paraphrases) for r in requests),
            "neighborhood": sum(len(r.neighborhood) for r in requests),
            "unrelated": len(unrelated),
            "heldout_tokens": ppl_tokens,
            "generations": len(texts_out),
            "scored_pairs": len(prompts),
        },
        "details": {
            "neighborhood": neighbor_keys,
            "neighborhood_argmax": argmax,
            "unrelated_answered": answered,
            "generations": texts_out,
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


# -- comparison and footprint ------------------------------------------------------------------------------


def footprint(items: Iterable[PatchSource | TensorDelta] | PatchSource | TensorDelta) -> dict[str, Any]:
    """Neurons, parameters and bytes that patches (or tensor deltas) change, neurons united per tensor;
    patches may be given as anything :func:`~nmke_patch.sources.resolve_patches` takes, one alone or several.

    Returns:
        ``{"tensors": {name: {"neurons", "of_neurons", "share"}}, "union_neurons", "mean_share",
        "max_share", "parameters_changed", "patch_bytes", "dense_bytes"}``; ``patch_bytes`` is the payload
        (indices, deltas, originals) summed over the patches, ``dense_bytes`` what the same tensors would take
        with every neuron stored.
    """
    union: dict[str, set[int]] = {}
    meta: dict[str, TensorDelta] = {}
    patch_bytes = 0
    if items is None:
        raise TypeError("footprint: None is not a patch (expected paths, Patch objects or TensorDeltas)")
    if isinstance(items, (str, os.PathLike, Patch, TensorDelta)):
        items = [items]
    for item in items:
        if item is None:
            raise TypeError("footprint: None is not a patch (expected paths, Patch objects or TensorDeltas)")
        if isinstance(item, TensorDelta):
            deltas: tuple[TensorDelta, ...] = (item,)
        else:
            deltas = tuple(d for p in resolve_patches(item) for d in p.deltas)
        for d in deltas:
            union.setdefault(d.name, set()).update(d.indices.tolist())
            meta[d.name] = d
            patch_bytes += d.nbytes
    tensors = {}
    params = 0
    dense = 0
    for name in sorted(union, key=_layer_order):
        d = meta[name]
        total = int(d.shape[d.neuron_axis])
        k = len(union[name])
        tensors[name] = {"neurons": k, "of_neurons": total, "share": k / total}
        params += k * d.value_dim
        per_neuron = d.indices.element_size() + d.value_dim * (
            d.delta.element_size() + d.original.element_size()
        )
        dense += total * per_neuron
    shares = [t["share"] for t in tensors.values()]
    return {
        "tensors": tensors,
        "union_neurons": sum(t["neurons"] for t in tensors.values()),
        "mean_share": sum(shares) / len(shares) if shares else 0.0,
        "max_share": max(shares, default=0.0),
        "parameters_changed": params,
        "patch_bytes": patch_bytes,
        "dense_bytes": dense,
    }


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a parameter name (``model.layers.3.mlp.down_proj.weight`` -> 3)."""
    numbers = re.findall(r"\.(\d+)\.", name)
    return int(numbers[0]) if numbers else None


def _layer_order(name: str) -> tuple[int, str]:
    index = layer_index(name)
    return (-1 if index is None else index, name)


def compare(
    base: dict[str, Any], patched: dict[str, Any], *, patches: Iterable[Patch | TensorDelta] = ()
) -> dict[str, Any]:
    """Drift of ``patched`` against ``base`` (two :func:`evaluate` results) and the patches' footprint.

    ``base`` may cover more requests than ``patched`` (neighbourhood answers are matched by prompt and
    target). Returns ``{"zsre_neighborhood_agreement", "perplexity_drift_pct", "unrelated_retention",
    "fluency_change", "footprint"}``; a figure that cannot be computed is ``None``.
    """
    b_arg, p_arg = base["details"]["neighborhood_argmax"], patched["details"]["neighborhood_argmax"]
    per_request = []
    for keys in patched["details"]["neighborhood"]:
        shares = []
        for key in keys:
            if key in b_arg:
                a, b = b_arg[key], p_arg[key]
                shares.append(sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a)))
        per_request.append(_mean(shares))
    b_ans, p_ans = base["details"]["unrelated_answered"], patched["details"]["unrelated_answered"]
    known = [k for k, ok in b_ans.items() if ok and k in p_ans]
    bm, pm = base["metrics"], patched["metrics"]
    drift = (
        100.0 * (pm["perplexity"] / bm["perplexity"] - 1.0)
        if bm.get("perplexity") and pm.get("perplexity") is not None
        else None
    )
    fluency = (
        pm["fluency"] - bm["fluency"]
        if bm.get("fluency") is not None and pm.get("fluency") is not None
        else None
    )
    return {
        "zsre_neighborhood_agreement": _mean(per_request),
        "perplexity_drift_pct": drift,
        "unrelated_retention": _mean(float(p_ans[k]) for k in known) if known else None,
        "fluency_change": fluency,
        "footprint": footprint(patches),
    }


def _jsonable(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else str(obj)


def _base_cache_file(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], kwargs: dict[str, Any]
) -> Path:
    from .paths import home
    from .stats import model_fingerprint

    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = {
        "version": EVAL_VERSION,
        "model": model_fingerprint(model),
        "tokenizer": hashlib.sha256(backend.to_str().encode()).hexdigest()
        if backend
        else type(tokenizer).__name__,
        "requests": [r.to_json() for r in requests],
        "settings": kwargs,
    }
    text = json.dumps(payload, sort_keys=True, default=_jsonable)
    key = hashlib.sha256(text.encode()).hexdigest()
    return home() / "eval" / f"base-{key[:32]}.json"


def evaluate_pair(
    model: nn.Module,
    tokenizer: Any,
    requests: RequestsLike,
    patches: Iterable[PatchSource] | PatchSource,
    *,
    force: bool = False,
    cache: bool = True,
    progress: Progress | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` with ``patches`` applied (removed again afterwards), then the base, and compare.

    Args:
        model: a base model with no patches applied.
        force: apply patches even where their recorded originals differ from the model.
        cache: reuse (and store) the base model's result under ``$NMKE_PATCH_HOME/eval/``, keyed by the
            model's weights, the tokenizer, the requests and the settings.
        kwargs: passed to :func:`evaluate`.

    Returns:
        ``{"base": evaluate(...), "patched": evaluate(...), "comparison": compare(...), "base_cached": bool,
        "forced": [names of the patches applied only by force, each checked on top of those before it]}``.
    """
    # every argument checked before any patch touches the model
    inspect.signature(evaluate).bind(model, tokenizer, requests, **kwargs)  # TypeError for an unknown one
    _check_counts(**{k: v for k, v in kwargs.items() if k in inspect.signature(_check_counts).parameters})
    requests = as_requests(requests)
    resolved = resolve_patches(patches)
    stack = PatchStack.for_model(model)
    if not force:
        check_lineage(resolved, [m.id for m in stack.merged])
    if stack.applied:
        raise InvalidRequestError("evaluate_pair needs the base model: unload the applied patches first")
    say = progress or (lambda _stage: None)
    if kwargs.get("unrelated") is None:
        kwargs["unrelated"] = load_unrelated()
    if kwargs.get("heldout_text") is None:
        kwargs["heldout_text"] = load_heldout()
    _check_lengths(model, tokenizer, requests, kwargs["unrelated"])
    forced = []
    try:  # the patched model first: a patch that does not fit fails before any evaluation
        for p in resolved:
            if force:
                try:
                    stack.check(p)
                except PatchMismatchError:
                    forced.append(p.name)
            stack.apply(p, force=force)
        patched = evaluate(model, tokenizer, requests, progress=lambda s: say(f"patched: {s}"), **kwargs)
    finally:
        stack.unload_all()  # exact: the base again, for its evaluation and its cache key
    file = _base_cache_file(model, tokenizer, requests, kwargs) if cache else None
    base = None
    if file is not None and file.is_file():
        try:
            base = json.loads(file.read_text(encoding="utf-8"))
            say("base: reusing the cached result")
        except (OSError, json.JSONDecodeError):
            base = None
    cached = base is not None
    if base is None:
        base = evaluate(model, tokenizer, requests, progress=lambda s: say(f"base: {s}"), **kwargs)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            staging = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            staging.write_text(json.dumps(base), encoding="utf-8")
            os.replace(staging, file)
    comparison = compare(base, patched, patches=resolved)
    return {
        "base": base,
        "patched": patched,
        "comparison": comparison,
        "base_cached": cached,
        "forced": forced,
    }
