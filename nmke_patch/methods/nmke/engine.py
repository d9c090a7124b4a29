"""The editing loop: target values, attribution and mask, layer-by-layer solve, lifelong key state.

:class:`Editor` edits a live model one batch at a time (through a :class:`PatchStack` "working" patch,
so the model is always exactly base + the accumulated float32 delta) and can save and restore its state
for checkpoints. The dense baselines (AlphaEdit, MEMIT) run through the same loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from ...architectures import check_edited_layers, decoder_layers, get_submodule, spec_for_model
from ...delta import TensorDelta, all_finite, gather_neurons, make_delta
from ...errors import EditError
from ...patch import Manifest, Patch
from ...requests import EditRequest
from ...stack import PatchStack
from ...stats import nullspace_basis
from ...tokens import text_ids
from ...tracing import capture, replay_prefix, stop_after
from .attribution import neuron_scores
from .config import EditConfig
from .contrast import LookAlikeSubjects
from .mask import apply_budget, hybrid_mask, mask_ratios, ranked_candidates, ranks
from .prompts import Batch, encode, sample_prefixes, target_logprobs_from_hidden
from .solve import solve_layer
from .values import compute_target_value

logger = logging.getLogger(__name__)


@dataclass
class EditRecord:
    """Measurements of one edit request."""

    index: int
    id: str | None
    p_new_before: float
    p_new_after: float
    z_steps: int
    neurons: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.id,
            "p_new_before": self.p_new_before,
            "p_new_after": self.p_new_after,
            "z_steps": self.z_steps,
            "neurons": self.neurons,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> EditRecord:
        """The record :meth:`to_json` wrote. Raises KeyError for a missing field and TypeError for a
        field of the wrong kind."""
        if not isinstance(data, dict):
            raise TypeError(f"an edit record must be an object, not {type(data).__name__}")
        record = cls(**{f: data[f] for f in _RECORD_FIELDS})
        number = (int, float)
        checks = (
            ("index", isinstance(record.index, int) and not isinstance(record.index, bool)),
            ("id", record.id is None or isinstance(record.id, str)),
            ("p_new_before", isinstance(record.p_new_before, number)),
            ("p_new_after", isinstance(record.p_new_after, number)),
            ("z_steps", isinstance(record.z_steps, int)),
            (
                "neurons",
                isinstance(record.neurons, dict) and all(isinstance(v, int) for v in record.neurons.values()),
            ),
            (
                "seconds",
                isinstance(record.seconds, dict)
                and all(isinstance(v, number) for v in record.seconds.values()),
            ),
        )
        for name, ok in checks:
            if not ok:
                raise TypeError(f"edit record {data.get('index')!r}: field {name!r} has the wrong type")
        return record


_RECORD_FIELDS = ("index", "id", "p_new_before", "p_new_after", "z_steps", "neurons", "seconds")


@dataclass
class _Forward:
    keys_subject: dict[int, torch.Tensor]  # [B, D]
    keys_last: dict[int, torch.Tensor]  # [B, D]
    h_mid_last: dict[int, torch.Tensor]  # [B, d]
    out_subject: torch.Tensor  # [B, d] output of the last edited layer at the subject
    final_last: torch.Tensor  # [B, d]
    logits_last: torch.Tensor  # [B, V]
    target_lp: torch.Tensor  # [B]
    entry: torch.Tensor  # [B, T, d] hidden states entering the first edited layer (on the model's device)


@dataclass(frozen=True)
class _Columns:
    """How a batch's prompt rows become the key columns of the solve (see :meth:`Editor._columns`)."""

    key_map: torch.Tensor  # [c, B]: key_map @ rows = the columns
    residual_map: torch.Tensor  # [c, B]: what each column's residual is measured on
    weights: torch.Tensor  # [c], summing to 1 per request
    owner: torch.Tensor  # [c] request index of each column
    peer_map: torch.Tensor  # [c, B]: rows whose mean key length a column is compared with (sink_ratio)


def compress_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[m, D]`` unchanged while ``m <= D``, else ``D`` rows with the same ``rows^T rows`` (from its
    eigendecomposition, in float64): a second-moment factor that never outgrows ``[D, D]``."""
    if rows.shape[0] <= rows.shape[1]:
        return rows
    gram = rows.double().T @ rows.double()
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    return (values.clamp_min(0).sqrt()[:, None] * vectors.T).float()


class Editor:
    """Computes NMKE / AlphaEdit / MEMIT edits on a live model."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        config: EditConfig,
        *,
        c0: dict[int, torch.Tensor],
        past_keys: dict[int, torch.Tensor] | None = None,
        c_first: dict[int, torch.Tensor] | None = None,
        bank: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config.resolved()
        if self.config.contrast_bank > 0 and bank is None:
            raise ValueError("contrast_bank > 0 needs the key bank of the preserved text (bank)")
        self.spec = spec_for_model(model)
        num_layers = len(decoder_layers(model, self.spec))
        self.layers = (
            list(config.layers) if config.layers is not None else self.spec.default_layers(num_layers)
        )
        problem = check_edited_layers(self.layers, num_layers, subject_last=True)  # the rest: per edit
        if problem:
            raise ValueError(problem)
        self.num_layers = num_layers
        self.device = next(model.parameters()).device
        self.stack = PatchStack.for_model(model)
        params = dict(model.named_parameters())
        self.weights = {l: params[self.spec.weight_name(l)] for l in self.layers}
        self.d_ff = int(self.weights[self.layers[0]].shape[self.spec.neuron_axis])
        self.c0 = {l: c0[l].float().cpu() for l in self.layers}
        if self.config.first_token_weight > 0:
            if c_first is None:
                raise ValueError("first_token_weight > 0 needs the first-token statistics (c_first)")
            for l in self.layers:
                self.c0[l] = self.c0[l] + self.config.first_token_weight * c_first[l].float().cpu()
        self.basis = (
            {l: nullspace_basis(self.c0[l], config.projector_energy) for l in self.layers}
            if config.method == "alphaedit" or (config.method == "nmke" and config.masked_solve == "post")
            else {}
        )
        for l, basis in self.basis.items():  # the threshold is relative, so say what it kept (-v)
            logger.info(
                "layer %d: the null space of C0 keeps %d of %d dimensions (projector_energy %g)",
                l,
                basis.shape[1],
                self.d_ff,
                config.projector_energy,
            )
        self.past_keys = {
            l: (past_keys or {}).get(l, torch.zeros(0, self.d_ff)).float().cpu() for l in self.layers
        }
        self.c_past = {l: self.past_keys[l].T @ self.past_keys[l] for l in self.layers}
        self.bank = (
            {l: bank[l].float() for l in self.layers}
            if bank is not None and self.config.contrast_bank
            else {}
        )
        self.new_keys: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        # kept contrast statistics (contrast_keep) of this editor's edits, as rows F with F^T F = their sum,
        # at most 2 d_ff of them (compress_rows)
        self.kept_contrast = {l: torch.zeros(0, self.d_ff) for l in self.layers}
        # with contrast_decay < 1, the same statistics as a matrix (their share of c_past), to decay it
        self.c_kept = (
            {l: torch.zeros(self.d_ff, self.d_ff) for l in self.layers}
            if self.config.contrast_keep > 0 and self.config.contrast_decay < 1
            else {}
        )
        self.cum = {
            l: torch.zeros(self.d_ff, self.weights[l].shape[1 - self.spec.neuron_axis]) for l in self.layers
        }
        self.touched = {l: torch.zeros(self.d_ff, dtype=torch.bool) for l in self.layers}
        self.records: list[EditRecord] = []
        self.prefixes = sample_prefixes(
            model, tokenizer, config.n_prefixes, config.prefix_tokens, config.seed
        )
        self._working: Patch | None = None
        self._look_alikes = LookAlikeSubjects(model, tokenizer, self.config, self.device)
        self._serial = 0
        norm = get_submodule(model, self.spec.final_norm)
        self._norm_gain = cast(torch.Tensor, norm.weight).detach()
        self._norm_bias = getattr(norm, "bias", None)
        self._norm_eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self._unembed = cast(torch.Tensor, get_submodule(model, self.spec.lm_head).weight).detach()

    # -- forward passes -------------------------------------------------------------------------

    def _batch(self, requests: Sequence[EditRequest]) -> tuple[Batch, list[int]]:
        texts, subjects, targets, owner = [], [], [], []
        for i, r in enumerate(requests):
            for p in ["", *self.prefixes]:
                texts.append(p + r.text)
                subjects.append(r.subject)
                targets.append(r.target_new)
                owner.append(i)
        return encode(self.tokenizer, texts, subjects, targets).to(self.device), owner

    @torch.no_grad()
    def _forward(self, batch: Batch, layers: Sequence[int]) -> _Forward:
        spec = self.spec
        inputs = {f"k{l}": f"{spec.layers}.{l}.{spec.mlp_out}" for l in layers}
        inputs |= {f"m{l}": f"{spec.layers}.{l}.{spec.mlp_norm}" for l in layers}
        inputs["final"] = spec.final_norm
        inputs["entry"] = f"{spec.layers}.{self.layers[0]}"
        outputs = {"out": f"{spec.layers}.{self.layers[-1]}"}
        with capture(self.model, inputs=inputs, outputs=outputs) as seen:
            hidden = self.model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        rows = torch.arange(batch.input_ids.shape[0], device=self.device)
        sp, lp = batch.subject_pos, batch.last_pos
        return _Forward(
            keys_subject={l: seen[f"k{l}"][rows, sp].float().cpu() for l in layers},
            keys_last={l: seen[f"k{l}"][rows, lp].float().cpu() for l in layers},
            h_mid_last={l: seen[f"m{l}"][rows, lp].float().cpu() for l in layers},
            out_subject=seen["out"][rows, sp].float().cpu(),
            final_last=seen["final"][rows, lp].float().cpu(),
            logits_last=self.model.get_output_embeddings()(hidden[rows, lp]).float().cpu(),
            target_lp=target_logprobs_from_hidden(self.model, hidden, batch).float().cpu(),
            entry=seen["entry"].detach(),
        )

    @torch.no_grad()
    def _keys_and_output(
        self, batch: Batch, layer: int, start: int, entry: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys of ``layer`` ``[B, D]`` and the last edited layer's output ``[B, d]`` at the subject, plus
        the hidden states entering ``layer`` (the next call's ``entry``).

        Layers below ``start`` are not run: ``entry`` (the hidden states entering ``start``, recorded by
        the previous pass with the same weights below it) stands in for them; the pass stops after the
        last edited layer.
        """
        spec, last = self.spec, self.layers[-1]
        with (
            replay_prefix(decoder_layers(self.model, spec), start - 1, lambda: entry)
            if start > 0
            else nullcontext(),
            capture(
                self.model,
                inputs={"k": f"{spec.layers}.{layer}.{spec.mlp_out}", "entry": f"{spec.layers}.{layer}"},
                outputs={"out": f"{spec.layers}.{last}"},
            ) as seen,
            stop_after(get_submodule(self.model, f"{spec.layers}.{last}")),
        ):
            self.model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        rows = torch.arange(batch.input_ids.shape[0], device=self.device)
        sp = batch.subject_pos
        return seen["k"][rows, sp].float().cpu(), seen["out"][rows, sp].float().cpu(), seen["entry"]

    @torch.no_grad()
    def _contrast_keys(self, requests: Sequence[EditRequest]) -> dict[int, torch.Tensor]:
        """Keys ``[D, m]`` per layer of subjects like the edited one, in the requests' own prompts.

        For each request, ``contrast_subjects`` candidate tokens are fed in place of the subject, after the
        prompt text that precedes it: the model's most likely next tokens there (other than the subject's
        own first token) or, when nothing precedes the subject (a prompt that opens with it), the tokens
        nearest the subject's first token in the input embedding (a text's first key depends on its token
        alone). The solve keeps the layer's output on their keys, so an edit of one subject does not carry
        over to its likely alternatives.
        """
        cfg, spec = self.config, self.spec
        if cfg.method != "nmke" or cfg.contrast_subjects == 0:
            return {}
        out: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        inputs = {f"k{l}": f"{spec.layers}.{l}.{spec.mlp_out}" for l in self.layers}
        last_key_module = get_submodule(self.model, f"{spec.layers}.{self.layers[-1]}.{spec.mlp_out}")
        for r in requests:
            before = r.prompt.split("{}", 1)[0]
            # without its trailing space: tokenizers attach that space to the next word (" France")
            ids = torch.tensor(
                [text_ids(self.tokenizer, before.rstrip(" "))], dtype=torch.long, device=self.device
            )
            own = text_ids(self.tokenizer, before + r.subject)[ids.shape[1] : ids.shape[1] + 1]
            if not own or not (before.strip() or cfg.contrast_subject_first):
                continue
            rows, last = self._look_alikes.rows(r, ids, own[0], opens=not before.strip())
            with capture(self.model, inputs=inputs) as seen, stop_after(last_key_module):
                self.model.base_model(input_ids=rows, use_cache=False)
            at = torch.arange(len(rows), device=self.device)
            for l in self.layers:
                out[l].append(seen[f"k{l}"][at, last].float().cpu().T)
        return {l: torch.cat(v, dim=1) for l, v in out.items() if v}

    def _nearest_preserved_keys(
        self, keys_subject: dict[int, torch.Tensor], bare: torch.Tensor, selected: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """Per layer, the ``contrast_bank`` keys of the preserved text (the bank) most like each request's
        subject key on the neurons the edit may change (cosine): the text an edit would carry over to most.
        Returns ``[D, m * requests]`` per layer."""
        m = self.config.contrast_bank
        if not self.bank or m == 0:
            return {}
        out = {}
        for l, bank in self.bank.items():
            s = selected[l].to(torch.long)
            sub = torch.nn.functional.normalize(bank[:, s], dim=1)
            subject = torch.nn.functional.normalize(keys_subject[l][bare][:, s], dim=1)  # [u, |S|]
            nearest = (sub @ subject.T).topk(min(m, len(bank)), dim=0).indices  # [m, u]
            out[l] = bank[nearest.T.reshape(-1)].T
        return out

    # -- model state ----------------------------------------------------------------------------

    def _tensor_deltas(self) -> tuple[TensorDelta, ...]:
        out = []
        for l in self.layers:
            idx = torch.nonzero(self.touched[l]).flatten()
            if idx.numel() and not all_finite(self.cum[l][idx]):
                raise EditError(
                    f"the update of layer {l} ({self.spec.weight_name(l)}) is not finite: the solve diverged. "
                    "Nothing was written; try --dtype fp32, --set min_preservation=300 or smaller batches"
                    + (
                        "; the parents' key state (--on) holds values up to "
                        f"{max(float(k.abs().max()) for k in self.past_keys.values() if k.numel()):.3g}: check it"
                        if any(k.numel() for k in self.past_keys.values())
                        else ""
                    )
                )
            if idx.numel():
                out.append(
                    make_delta(
                        self.spec.weight_name(l),
                        self.weights[l],
                        self.spec.neuron_axis,
                        idx,
                        self.cum[l][idx],
                    )
                )
        return tuple(out)

    def _refresh_weights(self) -> None:
        """Make the live weights exactly base + the accumulated delta (one rounding)."""
        if self._working is not None:
            self.stack.unload(self._working)
            self._working = None
        deltas = self._tensor_deltas()
        if deltas:
            self._serial += 1
            manifest = Manifest(name=f"nmke-working-{self._serial}", base_model={}, method={})
            self._working = Patch(manifest=manifest, deltas=deltas, id=f"working-{id(self)}-{self._serial}")
            self.stack.apply(self._working, force=True)

    def release(self) -> None:
        """Take the accumulated edits off the live model (it returns to its state before the editor)."""
        if self._working is not None:
            self.stack.unload(self._working)
            self._working = None

    def final_deltas(self) -> tuple[TensorDelta, ...]:
        """The accumulated edits as tensor deltas, originals taken from the model without them."""
        self.release()
        return self._tensor_deltas()

    # -- one batch --------------------------------------------------------------------------------

    def _columns(self, owner: list[int], n_requests: int) -> _Columns:
        """Key columns of a batch. ``key_columns="mean"``: one per request with the residual of its bare row,
        its key the mean of the bare row's and the prefixed rows' mean (MEMIT's and AlphaEdit's key: the
        bare prompt weighs as much as all the prefixed ones together). ``"contexts"``: the bare row and the
        mean of the prefixed rows, each with its own residual, weighted ``bare_weight`` and ``1 - bare_weight``.
        """
        rows = len(owner)
        own = torch.tensor(owner)
        maps, residual_maps, weights, column_owner, peers = [], [], [], [], []
        for i in range(n_requests):
            mine = torch.nonzero(own == i).flatten()
            bare, prefixed = mine[0], mine[1:]
            first = torch.zeros(rows).index_fill_(0, bare, 1.0)
            rest = torch.zeros(rows).index_fill_(0, prefixed, 1.0 / max(len(prefixed), 1))
            if self.config.key_columns == "mean" or len(prefixed) == 0:
                maps.append(first if len(prefixed) == 0 else 0.5 * first + 0.5 * rest)
                residual_maps.append(first)
                weights.append(1.0)
                column_owner.append(i)
                peers.append(torch.zeros(rows))
            else:
                maps += [first, rest]
                residual_maps += [first, rest]
                weights += [self.config.bare_weight, 1.0 - self.config.bare_weight]
                column_owner += [i, i]
                peers += [rest, torch.zeros(rows)]  # the bare key is checked against the prefixed ones
        return _Columns(
            torch.stack(maps),
            torch.stack(residual_maps),
            torch.tensor(weights),
            torch.tensor(column_owner),
            torch.stack(peers),
        )

    def _active(self, columns: _Columns, keys_subject: dict[int, torch.Tensor]) -> torch.Tensor:
        """``[c, layers]``: whether each key column is solved for at each edited layer. With ``sink_ratio``,
        a bare column whose key is more than that many times as long as the same subject's keys after a
        context prefix is left out where it is: that is a text's first token at a layer where the first
        position is the attention sink (its key the same for every text, and far longer), so changing its
        output would change every text."""
        active = torch.ones(len(columns.weights), len(self.layers), dtype=torch.bool)
        ratio = self.config.sink_ratio
        if ratio is None or self.config.method != "nmke":
            return active
        for j, l in enumerate(self.layers):
            lengths = keys_subject[l].float().norm(dim=1)  # [B]
            own = (columns.key_map @ keys_subject[l].float()).norm(dim=1)
            peer = columns.peer_map @ lengths
            active[:, j] = ~((peer > 0) & (own > ratio * peer))
        return active

    def _select(
        self,
        fw: _Forward,
        owner: list[int],
        n_requests: int,
        columns: _Columns,
        contrast: dict[int, torch.Tensor],
        active: torch.Tensor,
    ) -> dict[int, list[torch.Tensor]]:
        """Per layer, each request's candidate neurons (its mask), best first; ``apply_budget`` budgets them.
        The specificity ranking counts only the key columns solved for at the layer (``active``)."""
        cfg = self.config
        if cfg.dense:
            return {l: [torch.arange(self.d_ff)] for l in self.layers}
        own = torch.tensor(owner)
        answers = fw.logits_last.argmax(dim=-1)
        ranked = {}
        for j, l in enumerate(self.layers):
            values = (
                gather_neurons(self.weights[l].detach(), self.spec.neuron_axis, torch.arange(self.d_ff))
                .float()
                .cpu()
            )
            chosen = []
            for i in range(n_requests):
                rows = own == i
                scores = neuron_scores(
                    spec=self.spec,
                    values=values,
                    activations=fw.keys_last[l][rows],
                    h_mid=fw.h_mid_last[l][rows],
                    final_resid=fw.final_last[rows],
                    answers=answers[rows],
                    norm_gain=self._norm_gain.cpu(),
                    norm_bias=None if self._norm_bias is None else self._norm_bias.detach().cpu(),
                    norm_eps=self._norm_eps,
                    unembed=self._unembed.cpu(),
                    amplification=cfg.amplification,
                    vocab_limit=cfg.attribution_vocab,
                )
                ratios = mask_ratios(
                    scores, temperature=cfg.temperature, low=cfg.ratio_min, high=cfg.ratio_max
                )
                mask, priority = hybrid_mask(scores, ratios)
                if cfg.neuron_score != "hybrid":
                    mine = columns.owner == i
                    k = columns.key_map[mine] @ fw.keys_subject[l]  # the request's key columns
                    weight = columns.weights[mine] * active[mine, j]  # a sink key left out is not ranked for
                    energy = (weight[:, None] * k.pow(2)).sum(dim=0)
                    reference = torch.diagonal(self.c0[l])
                    if cfg.contrast_score > 0 and l in contrast:  # look-alike subjects' activity too
                        reference = reference + cfg.contrast_score * contrast[l].pow(2).mean(dim=1)
                    cheap = energy / reference.clamp_min(1e-12)
                    priority = cheap if cfg.neuron_score == "specificity" else ranks(priority) + ranks(cheap)
                # prefer neurons earlier edits already changed: a smaller lifetime patch
                if cfg.reuse_touched > 0:
                    priority = ranks(priority) + cfg.reuse_touched * self.touched[l].float()
                chosen.append(ranked_candidates(mask, priority))
            ranked[l] = chosen
        return ranked

    def _budget(self, fraction: float | None) -> int:
        """Neurons per layer for a budget given as a fraction (None, or a dense method: all)."""
        return self.d_ff if fraction is None or self.config.dense else max(1, int(fraction * self.d_ff))

    def _sweep(
        self,
        batch: Batch,
        fw: _Forward,
        row_targets: torch.Tensor,
        columns: _Columns,
        selected: dict[int, torch.Tensor],
        contrast: dict[int, torch.Tensor],
        active: torch.Tensor,
    ) -> None:
        """One pass over the edited layers, ascending: each realises its share of what is still missing.

        ``row_targets`` ``[B, d]``: the last edited layer's output each prompt row should have; ``active``
        ``[c, layers]``: where each column is solved for (:meth:`_active`).
        """
        scale = columns.weights.sqrt()[:, None]
        start, entry = self.layers[0], fw.entry
        for j, l in enumerate(self.layers):
            if j == 0:
                key_rows, out_rows = fw.keys_subject[l], fw.out_subject
            else:  # layers below the one edited last are unchanged since the previous pass
                key_rows, out_rows, next_entry = self._keys_and_output(batch, l, start, entry)
                start, entry = l, next_entry
            cols = active[:, j]
            if not bool(cols.any()):
                continue
            keys = (scale * (columns.key_map @ key_rows)).T[:, cols]  # [D, c]
            # MEMIT spreading over the layers left (those where the column is solved for)
            left = active[cols, j:].sum(dim=1)
            residual = (scale * (columns.residual_map @ (row_targets - out_rows))).T[:, cols] / left  # [d, c]
            protect = (
                self.c_past[l] if self.config.past_weight == 1 else self.config.past_weight * self.c_past[l]
            )
            if l in contrast:
                protect = protect + self.config.contrast_weight * contrast[l] @ contrast[l].T
            update = solve_layer(
                keys,
                residual,
                config=self.config,
                c0=self.c0[l],
                c_past=protect,
                basis=self.basis.get(l),
                selected=selected[l],
                weights=columns.weights[cols],
            )
            self.cum[l][update.rows] += update.x
            self.touched[l][update.rows] = True
            self._refresh_weights()

    def _apply_sweeps(
        self, sweep: Callable[[_Forward], None], batch: Batch, fw: _Forward, bare: torch.Tensor
    ) -> tuple[_Forward, float]:
        """``sweep`` (one pass from a forward pass) until every request reaches ``sweep_until``, at most
        ``max_sweeps`` times (the dense baselines: once). Returns the forward pass of the edited model and
        the seconds spent solving."""
        solve_s = 0.0
        sweeps = self.config.max_sweeps if self.config.method == "nmke" else 1  # baselines: as published
        for _ in range(sweeps):
            t_sweep = time.perf_counter()
            sweep(fw)
            t_after = time.perf_counter()
            after = self._forward(batch, self.layers)
            solve_s += t_after - t_sweep
            if float(torch.exp(after.target_lp[bare]).min()) >= self.config.sweep_until:
                break
            fw = after
        return after, solve_s

    def edit(self, requests: Sequence[EditRequest], start_index: int) -> list[EditRecord]:
        """Edit ``requests`` together (one solve per layer) and keep the result on the live model."""
        problem = check_edited_layers(
            self.layers, self.num_layers, subject_last=all(r.subject_last for r in requests)
        )
        if problem:
            raise ValueError(problem)
        t0 = time.perf_counter()
        batch, owner = self._batch(requests)
        own = torch.tensor(owner)
        columns = self._columns(owner, len(requests))
        last = self.layers[-1]
        fw = self._forward(batch, self.layers)
        active = self._active(columns, fw.keys_subject)
        bare = torch.tensor([owner.index(i) for i in range(len(requests))])
        p_before = torch.exp(fw.target_lp[bare])
        t1 = time.perf_counter()
        targets = [
            compute_target_value(self.model, self.tokenizer, self.spec, last, r, self.prefixes, self.config)
            for r in requests
        ]
        z = torch.stack([t.z for t in targets], dim=1).cpu()  # [d, u]
        # every prompt of a request gets the same change of the edited layer's output: z - h on its bare row
        row_targets = fw.out_subject + (z.T - fw.out_subject[bare])[own]
        t2 = time.perf_counter()
        contrast = self._contrast_keys(requests)
        cfg = self.config
        size = self._budget(cfg.max_neurons)
        ranked = self._select(fw, owner, len(requests), columns, contrast, active)
        selected = {l: apply_budget(ranked[l], size) for l in self.layers}
        for l, near in self._nearest_preserved_keys(fw.keys_subject, bare, selected).items():
            contrast[l] = torch.cat([contrast[l], near], dim=1) if l in contrast else near
        t3 = time.perf_counter()
        cap = size if cfg.grow_budget_to is None else max(size, self._budget(cfg.grow_budget_to))
        cap = min(cap, max(len(r) for per_request in ranked.values() for r in per_request))  # masks' size
        saved = {l: (self.cum[l].clone(), self.touched[l].clone()) for l in self.layers} if cap > size else {}
        solve_s = 0.0
        while True:
            sweep = partial(
                self._sweep,
                batch,
                row_targets=row_targets,
                columns=columns,
                selected=selected,
                contrast=contrast,
                active=active,
            )
            after, seconds = self._apply_sweeps(sweep, batch, fw, bare)
            solve_s += seconds
            p_after = torch.exp(after.target_lp[bare])
            if float(p_after.min()) >= cfg.sweep_until or size >= cap:
                break
            # it did not land: solve it again from the model before it, on twice the neurons
            for l, (cum, touched) in saved.items():
                self.cum[l].copy_(cum)
                self.touched[l].copy_(touched)
            self._refresh_weights()
            size = min(2 * size, cap)
            selected = {l: apply_budget(ranked[l], size) for l in self.layers}
        for l in self.layers:
            new = columns.weights.sqrt()[:, None] * (columns.key_map @ after.keys_subject[l])  # [c, D]
            self.new_keys[l].append(new)
            self.c_past[l] += new.T @ new
            self._decay_kept_contrast(l, len(requests))
            if self.config.contrast_keep > 0 and l in contrast:
                kept = self.config.contrast_keep * self.config.contrast_weight
                fresh = kept * contrast[l] @ contrast[l].T
                self.c_past[l] += fresh
                if l in self.c_kept:
                    self.c_kept[l] += fresh
                rows = torch.cat([self.kept_contrast[l], math.sqrt(kept) * contrast[l].T])
                # compressed once it doubles a full factor: an eigendecomposition every ~d_ff/m edits
                self.kept_contrast[l] = compress_rows(rows) if len(rows) > 2 * self.d_ff else rows
        t5 = time.perf_counter()
        per = 1.0 / len(requests)
        records = []
        for i, r in enumerate(requests):
            rec = EditRecord(
                index=start_index + i,
                id=r.id,
                p_new_before=float(p_before[i]),
                p_new_after=float(p_after[i]),
                z_steps=targets[i].steps,
                neurons={str(l): int(selected[l].numel()) for l in self.layers},
                seconds={
                    "total": (t5 - t0) * per,
                    "z": (t2 - t1) * per,
                    "attribution": (t3 - t2) * per,
                    "solve": solve_s * per,
                    "forward": (t1 - t0 + t5 - t3 - solve_s) * per,  # before, after each sweep, after
                },
            )
            records.append(rec)
        self.records.extend(records)
        return records

    def _decay_kept_contrast(self, layer: int, edits: int) -> None:
        """Age the contrast statistics this editor kept by ``edits`` more edits (``contrast_decay``)."""
        if layer not in self.c_kept:
            return
        factor = self.config.contrast_decay**edits
        self.c_past[layer] -= (1 - factor) * self.c_kept[layer]
        self.c_kept[layer] *= factor
        self.kept_contrast[layer] *= math.sqrt(factor)

    # -- lifelong state ---------------------------------------------------------------------------

    def keys_state(self) -> dict[int, torch.Tensor]:
        """Key columns of every edit made by this editor (one or two per request, weighted), per layer
        ``[columns, D]``; they become ``C_past`` later."""
        return {
            l: torch.cat(self.new_keys[l]) if self.new_keys[l] else torch.zeros(0, self.d_ff)
            for l in self.layers
        }

    def chain_state(self) -> dict[str, torch.Tensor]:
        """What a patch carries to later ``create --on`` runs, per layer: ``keys.<l>`` (:meth:`keys_state`)
        and, with ``contrast_keep``, ``contrast.<l>``: rows whose ``F^T F`` is the contrast statistics these
        edits left in ``C_past``. A child's ``C_past`` starts as the sum of both over its parents."""
        out = {f"keys.{l}": keys.contiguous() for l, keys in self.keys_state().items()}
        for l, rows in self.kept_contrast.items():
            if rows.numel():
                out[f"contrast.{l}"] = compress_rows(rows).contiguous()
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume: accumulated deltas, touched masks, new keys, kept contrast rows (as
        they are, so a resumed run compresses them when an uninterrupted one would), C_past."""
        out = {f"keys.{l}": keys.contiguous() for l, keys in self.keys_state().items()}
        for l in self.layers:
            if self.kept_contrast[l].numel():
                out[f"contrast.{l}"] = self.kept_contrast[l].contiguous()
            out[f"cum.{l}"] = self.cum[l].contiguous()
            out[f"touched.{l}"] = self.touched[l].to(torch.uint8).contiguous()
            out[f"c_past.{l}"] = self.c_past[l].contiguous()
            if l in self.c_kept:
                out[f"c_kept.{l}"] = self.c_kept[l].contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], records: list[EditRecord]) -> None:
        """Restore :meth:`state_tensors` (from a checkpoint) and put the edits back on the model.

        Raises:
            KeyError, ValueError: a tensor is missing, or has another shape than this editor's or non-finite
                values (nothing is restored then).
        """
        for l in self.layers:
            expected = {
                f"cum.{l}": tuple(self.cum[l].shape),
                f"touched.{l}": tuple(self.touched[l].shape),
                f"c_past.{l}": tuple(self.c_past[l].shape),
                f"keys.{l}": (None, self.d_ff),
                f"contrast.{l}": (None, self.d_ff),
                **({f"c_kept.{l}": tuple(self.c_kept[l].shape)} if l in self.c_kept else {}),
            }
            for name, shape in expected.items():
                if name not in tensors:
                    if name.startswith("contrast."):  # absent in checkpoints written before it existed
                        continue
                    raise KeyError(f"missing {name}")
                t = tensors[name]
                wrong = t.dim() != len(shape) or any(
                    w is not None and w != n for w, n in zip(shape, t.shape, strict=False)
                )
                if wrong and not (name.startswith("keys.") and t.numel() == 0):
                    raise ValueError(f"{name} has shape {list(t.shape)}, this run's is {list(shape)}")
                if t.is_floating_point() and not all_finite(t):
                    raise ValueError(f"{name} holds non-finite values")
        for l in self.layers:
            self.cum[l] = tensors[f"cum.{l}"].float().clone()
            self.touched[l] = tensors[f"touched.{l}"].bool().clone()
            keys = tensors[f"keys.{l}"].float()
            self.new_keys[l] = [keys] if keys.numel() else []
            self.c_past[l] = tensors[f"c_past.{l}"].float().clone()
            kept = tensors.get(f"contrast.{l}")  # absent in checkpoints written before it existed
            self.kept_contrast[l] = torch.zeros(0, self.d_ff) if kept is None else kept.float().clone()
            if l in self.c_kept:
                self.c_kept[l] = tensors[f"c_kept.{l}"].float().clone()
        self.records = list(records)
        self._refresh_weights()
