"""Prompt construction: context prefixes, tokenization with subject and target positions, padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ...sampling import end_token_ids, sample_continuations
from ...tokens import MASKED_ID, last_text_id, without_appended

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "In", "It", "When")


def sample_prefixes(model: PreTrainedModel, tokenizer: Any, n: int, length: int, seed: int) -> list[str]:
    """``n`` short context prefixes sampled from the model itself (top-5 sampling, seeded), each ending in '. '.

    The draws come from a CPU generator (:mod:`nmke_patch.sampling`): the same prefixes on any device.
    """
    if n == 0:
        return []
    starts = [last_text_id(tokenizer, PREFIX_STARTS[i % len(PREFIX_STARTS)]) for i in range(n)]
    generator = torch.Generator().manual_seed(seed)
    out = sample_continuations(
        model, starts, length, top_k=5, generator=generator, banned=end_token_ids(model, tokenizer)
    )
    prefixes = []
    for row in out:
        text = (
            tokenizer.decode(row, skip_special_tokens=True)
            .replace("\n", " ")
            .replace("{", "")
            .replace("}", "")
        )
        prefixes.append(text.strip() + ". ")
    return prefixes


@dataclass
class Batch:
    """Right-padded token ids with per-row positions of interest."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor  # [B] index of the subject's last token (or -1)
    last_pos: torch.Tensor  # [B] index of the last prompt token before the target
    target_ids: list[list[int]]  # per row: target token ids (empty when none)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.subject_pos.to(device),
            self.last_pos.to(device),
            self.target_ids,
        )


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """The last token covering character ``char``: a byte-level tokenizer splits some characters (CJK,
    emoji, some accented letters) into several tokens that all report that character's span, and only the
    last of them has read the whole character."""
    covering = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
    if covering:
        return covering[-1]
    for i, (a, _b) in enumerate(offsets):  # char was whitespace merged into the next token
        if a > char:
            return i - 1
    return len(offsets) - 1


def split_subjects(tokenizer: Any, requests: Sequence[Any]) -> list[tuple[int, str]]:
    """Requests whose subject's last token runs on past the subject (``"{}s"`` with ``Yankee`` gives the
    token ``es``): ``(index, that token's text)``. The edit is keyed at that token all the same, so it
    binds to the longer word, not the subject alone."""
    found = []
    for i, r in enumerate(requests):
        text = r.text
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        offsets = without_appended(tokenizer, [tuple(o) for o in enc["offset_mapping"]])
        end = text.rfind(r.subject) + len(r.subject)
        at = _token_at(offsets, end - 1)
        if offsets[at][1] > end:
            found.append((i, text[offsets[at][0] : offsets[at][1]]))
    return found


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    subjects: Sequence[str | None],
    targets: Sequence[str | None],
) -> Batch:
    """Tokenize ``prompt [+ ' ' + target]`` rows; find the subject's last token and the last prompt token.

    ``prompts`` are complete texts (subject already filled in); ``subjects[i]`` is located by its last
    occurrence in the prompt text. The target, if any, is appended with a leading space and all but its
    last token are fed (teacher forcing); ``target_ids`` holds all its tokens.
    """
    rows, subject_pos, last_pos, target_ids = [], [], [], []
    for prompt, subject, target in zip(prompts, subjects, targets, strict=True):
        text = prompt + (" " + target if target else "")
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids: list[int] = without_appended(tokenizer, list(enc["input_ids"]))  # no EOS in a target
        offsets = without_appended(tokenizer, [tuple(o) for o in enc["offset_mapping"]])
        n_prompt = max(
            1, next((i for i, (a, _b) in enumerate(offsets) if a >= len(prompt) and i > 0), len(ids))
        )
        tgt = ids[n_prompt:] if target else []
        feed = ids[:n_prompt] + tgt[:-1]
        rows.append(feed)
        last_pos.append(n_prompt - 1)
        target_ids.append(tgt)
        if subject:
            start = prompt.rfind(subject)
            subject_pos.append(_token_at(offsets, start + len(subject) - 1) if start >= 0 else n_prompt - 1)
        else:
            subject_pos.append(-1)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), MASKED_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Batch(input_ids, mask, torch.tensor(subject_pos), torch.tensor(last_pos), target_ids)


def target_logprobs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum of log-probabilities of each row's target tokens given teacher forcing: ``[B]``."""
    rows, pos, tokens = target_positions(batch, logits.device)
    return _sum_per_row(
        torch.log_softmax(logits[rows, pos].float(), dim=-1), tokens, rows, len(batch.target_ids)
    )


def target_positions(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (row, position, token) of every target token; the position is where it is predicted."""
    rows: list[int] = []
    pos: list[int] = []
    tokens: list[int] = []
    for i, tgt in enumerate(batch.target_ids):
        start = int(batch.last_pos[i])
        rows += [i] * len(tgt)
        pos += range(start, start + len(tgt))
        tokens += tgt

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return t(rows), t(pos), t(tokens)


def _sum_per_row(logp: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    picked = logp.gather(1, tokens[:, None]).squeeze(1)
    return torch.zeros(n, device=logp.device, dtype=picked.dtype).index_add(0, rows, picked)


def target_logprobs_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Like :func:`target_logprobs` from final hidden states, unembedding only the target positions."""
    rows, pos, tokens = target_positions(batch, hidden.device)
    logits = model.get_output_embeddings()(hidden[rows, pos])
    return _sum_per_row(torch.log_softmax(logits.float(), dim=-1), tokens, rows, len(batch.target_ids))
