"""Subjects like an edited one (its contrast subjects): what the model expects in the subject's place.

An edit of one subject should not carry over to its likely alternatives. :class:`LookAlikeSubjects` finds
them as token rows to feed the model: the model's most likely next tokens after the prompt text before the
subject, or, for a prompt that opens with the subject, the tokens nearest its first token in the input
embedding (``contrast_first="embedding"``) or the names the model lists after it (``"list"``); with
``contrast_words`` each is completed to a whole word. :class:`~.engine.Editor` reads their keys.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import PreTrainedModel

from ...requests import EditRequest
from ...tokens import text_ids
from .config import EditConfig


class LookAlikeSubjects:
    """Token rows of the subjects like an edited one, for the contrast keys of the solve."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, config: EditConfig, device: torch.device
    ) -> None:
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self._unit_embeddings: torch.Tensor | None = None

    def rows(
        self, r: EditRequest, ids: torch.Tensor, own: int, *, opens: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows of the subjects like ``r``'s, right-padded, and each row's last subject token.

        ``ids``: the prompt text before the subject; ``own``: the subject's first token; ``opens``: no text
        precedes the subject.
        """
        cfg = self.config
        if opens and cfg.contrast_first == "list":
            listed = self._listed(r.subject, cfg.contrast_subjects)
            if listed is not None:
                return listed
        wide = (64 if cfg.contrast_words else 1) * cfg.contrast_subjects
        if not opens:
            logits = self.model(input_ids=ids, use_cache=False).logits[0, -1]
            logits[own] = -float("inf")
            pool = logits.topk(min(len(logits), wide)).indices
        else:
            pool = self._nearest_tokens(own, wide)
        if cfg.contrast_words:  # few names among the predictions: top up with tokens like the subject's
            pool = torch.cat([pool, self._nearest_tokens(own, 8 * cfg.contrast_subjects)])
            candidates = self._like_subject(ids, pool, r.subject, cfg.contrast_subjects)
            return self._complete_words(ids, candidates)
        candidates = pool[: cfg.contrast_subjects]
        rows = torch.cat([ids.expand(len(candidates), -1), candidates[:, None]], dim=1)
        return rows, torch.full((len(candidates),), rows.shape[1] - 1, device=self.device)

    @torch.no_grad()
    def _listed(self, subject: str, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Names the model lists after ``subject`` ("Vancouver," -> Toronto, Seattle, ...), each completed
        greedily to a whole word and then put at the start of a text, as the subject of a prompt that opens
        with it is: ``(rows, last)`` as :meth:`_complete_words`, or None if the model lists no name."""
        ids = torch.tensor([text_ids(self.tokenizer, subject + ",")], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, -1]
        pool = logits.topk(min(len(logits), 8 * count)).indices
        rows, last = self._complete_words(ids, self._like_subject(ids, pool, subject, 2 * count))
        n, taken = ids.shape[1], {subject, *subject.split()}  # not the subject, nor a word of it
        names = [
            str(self.tokenizer.decode(rows[i, n : int(last[i]) + 1].tolist())).strip()
            for i in range(len(rows))
        ]
        names = [
            w
            for w in dict.fromkeys(names)
            if len(w) > 1 and w not in taken and w[:1].isupper() == subject[:1].isupper()
        ][:count]
        if not names:
            return None
        encoded = [text_ids(self.tokenizer, w) for w in names]
        width = max(len(e) for e in encoded)
        # right-padded by repeating the last token: causal attention, so padding cannot move a key before it
        padded = [e + [e[-1]] * (width - len(e)) for e in encoded]
        return (
            torch.tensor(padded, device=self.device),
            torch.tensor([len(e) - 1 for e in encoded], device=self.device),
        )

    def _added_text(self, ids: list[int], token: int) -> str:
        return str(self.tokenizer.decode([*ids, token]))[len(self.tokenizer.decode(ids)) :]

    def _like_subject(self, ids: torch.Tensor, pool: torch.Tensor, subject: str, count: int) -> torch.Tensor:
        """The first ``count`` tokens of ``pool`` that start a word capitalised as ``subject`` is."""
        context = ids[0].tolist()
        capital = subject[:1].isupper()
        keep: list[int] = []
        for t in dict.fromkeys(pool.tolist()):
            text = self._added_text(context, t).strip()
            if text[:1].isalpha() and text[:1].isupper() == capital:
                keep.append(t)
            if len(keep) == count:
                break
        return torch.tensor(keep or pool[:count].tolist(), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _complete_words(
        self, ids: torch.Tensor, candidates: torch.Tensor, max_extra: int = 3
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``context + candidate``, each extended greedily while the model continues the same word.

        Returns ``(rows [m, L], last [m])``: rows right-padded by repeating their last token (causal
        attention: what follows a position cannot change its key) and the index of each row's last token.
        """
        rows = torch.cat([ids.expand(len(candidates), -1), candidates[:, None]], dim=1)
        last = torch.full((len(rows),), rows.shape[1] - 1, device=self.device)
        growing = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        at = torch.arange(len(rows), device=self.device)
        for _ in range(max_extra):
            logits = self.model(input_ids=rows, use_cache=False).logits[at, last]
            nxt = logits.argmax(-1)
            for i in torch.nonzero(growing).flatten().tolist():
                added = self._added_text(rows[i, : int(last[i]) + 1].tolist(), int(nxt[i]))
                growing[i] = bool(added) and added[0].isalnum()
            if not growing.any():
                break
            rows = torch.cat([rows, rows[at, last][:, None]], dim=1)
            last = last + growing.long()
            rows[at[growing], last[growing]] = nxt[growing]
        return rows, last

    def _nearest_tokens(self, token: int, count: int) -> torch.Tensor:
        """The ``count`` tokens (not ``token``) whose input embeddings have the highest cosine with its."""
        if self._unit_embeddings is None:  # input embeddings are never edited: normalise them once
            table = cast(torch.Tensor, self.model.get_input_embeddings().weight).detach().float()
            self._unit_embeddings = table / table.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit = self._unit_embeddings
        similarity = unit @ unit[token]
        similarity[token] = -float("inf")
        return similarity.topk(min(count, len(similarity) - 1)).indices.to(self.device)
