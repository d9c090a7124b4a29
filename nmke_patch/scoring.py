"""Teacher-forced scoring of (prompt, target) pairs, batched and with shared work run once.

:func:`score_targets` right-pads rows; every (prompt, target) pair is read at its own positions, token rows
shared between pairs (identical, or one a prefix of another) run once, openings shared by several rows run
once (the rows continue from their KV cache), and only target positions are unembedded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compat import cache_argument, returned_cache
from .methods.nmke.prompts import encode
from .tokens import MASKED_ID


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


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, W]`` token ids and attention mask."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, : len(row)] = torch.tensor(list(row))
            mask[b, : len(row)] = 1
    return ids, mask


def length_buckets(items: list[int], width: Callable[[int], int], max_batch_tokens: int) -> list[list[int]]:
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


def backbone(model: nn.Module) -> Any:
    """The transformer without its LM head (``model.base_model``): final hidden states, no logits."""
    return model.base_model


def lm_head(model: nn.Module) -> Any:
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
    for batch in length_buckets(list(range(len(stems))), lambda i: len(stems[i]), max_batch_tokens):
        ids, mask = pad_rows([stems[i] for i in batch], pad)
        result = backbone(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
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
    base = backbone(model)
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
    for batch in length_buckets(plain, lambda r: len(rows[r]), max_batch_tokens):
        ids, mask = pad_rows([rows[r] for r in batch], pad)
        hidden = backbone(model)(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).last_hidden_state
        yield [(r, hidden[b, : len(rows[r])]) for b, r in enumerate(batch)]
    shared = [r for r in range(len(rows)) if stem_len[r]]
    for batch in length_buckets(shared, lambda r: len(rows[r]) - stem_len[r], max_batch_tokens):
        mine = [stems[index[tuple(rows[r][: stem_len[r]])]] for r in batch]
        ids, mask = pad_rows([rows[r][stem_len[r] :] for r in batch], pad)
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
    pad = MASKED_ID
    unembed = lm_head(model)
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
