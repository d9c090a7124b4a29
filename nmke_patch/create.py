"""``create``: turn edit requests into a patch (load, statistics, parents, edit loop, checkpoints, write)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import check_edited_layers, decoder_layers, spec_for_model
from .checkpoints import (
    check_run_key,
    damaged_checkpoint,
    load_checkpoint,
    refuse_interrupted_run,
    run_key,
    save_checkpoint,
)
from .consistency import refuse_conflicts
from .errors import InvalidPatchError, InvalidRequestError
from .inference import inference_state
from .lengths import check_fits, context_length
from .methods.nmke.config import EditConfig
from .methods.nmke.engine import Editor
from .methods.nmke.prompts import encode, split_subjects, target_logprobs_from_hidden
from .models import BaseModelInfo, check_resident, tensor_fingerprint
from .patch import Manifest, ParentRef, Patch
from .requests import EditRequest, RequestsLike, as_requests
from .sources import PatchSource, resolve_patches
from .stack import PatchStack, check_lineage
from .stats import StatsProgress, check_corpus, load_statistics, model_fingerprint
from .version import __version__

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    info: BaseModelInfo


@torch.no_grad()
def target_probabilities(
    model: PreTrainedModel, tokenizer: Any, prompts: list[str], targets: list[str], batch_size: int = 32
) -> torch.Tensor:
    """P(target | prompt) (whole target sequence) for each pair, batched."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        b = encode(
            tokenizer,
            prompts[s : s + batch_size],
            [None] * len(prompts[s : s + batch_size]),
            targets[s : s + batch_size],
        ).to(device)
        hidden = model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        out.append(torch.exp(target_logprobs_from_hidden(model, hidden.last_hidden_state, b)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def parent_key_rows(
    parents: Sequence[Patch], model: nn.Module, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Per edited layer, the parents' state rows (``keys.<l>`` and ``contrast.<l>``) whose ``F^T F`` starts
    the run's ``C_past``. A row of another width than the layer's neurons is refused before anything runs;
    state of layers this run does not edit is not needed."""
    spec = spec_for_model(model)
    params = dict(model.named_parameters())
    rows: dict[int, list[torch.Tensor]] = {}
    for p in parents:
        for key, t in sorted(p.state.items()):
            layer = int(key.split(".")[1])
            if layer not in layers:
                continue
            width = params[spec.weight_name(layer)].shape[spec.neuron_axis]
            if t.shape[1] != width:
                raise InvalidPatchError(
                    f"patch {p.name!r}: state {key!r} has rows of {t.shape[1]} neurons; layer {layer} has {width}"
                )
            rows.setdefault(layer, []).append(t.float())
    return {l: torch.cat(v) for l, v in rows.items()}


def create_patch(
    requests: RequestsLike,
    *,
    loaded: LoadedModel,
    config: EditConfig,
    name: str,
    on: Sequence[PatchSource] = (),
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    checkpoint_every: int = 25,
    progress: Progress | None = None,
    stats_progress: StatsProgress | None = None,
    stop_after: int | None = None,
) -> Patch:
    """Compute edits for ``requests`` on ``loaded`` (left unchanged afterwards) and return the unsaved patch.

    Args:
        requests: the facts: a facts file path, one record, or a list of records (:func:`as_requests`).
        on: parent patches; applied first, their key state continues into this run.
        checkpoint_dir: where to keep a resumable checkpoint (every ``checkpoint_every`` edits).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one. Without it, a checkpoint
            there of an unfinished run is refused (``InvalidRequestError``), never overwritten.
        progress: called as ``progress(done, total)`` after every batch.
        stats_progress: called as ``stats_progress(tokens_done, tokens_total)`` while preservation text for
            the key statistics is sampled (only when they are not cached yet).
        stop_after: stop (leaving the checkpoint) once this many requests are done: for tests of resume.
    """
    requests = as_requests(requests)
    refuse_conflicts(requests)
    if not requests:
        raise InvalidRequestError("no edit requests")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"name must be a non-empty string, not {name!r}")
    if not isinstance(loaded, LoadedModel) or not isinstance(config, EditConfig):
        raise TypeError(
            "create_patch takes loaded=LoadedModel(model, tokenizer, info) and config=EditConfig(...)"
        )
    model = getattr(loaded.model, "_orig_mod", loaded.model)  # torch.compile's wrapper: edit what it wraps
    loaded = replace(loaded, model=model)
    with inference_state(model):  # dropout off, no gradients left on the user's parameters
        return _create(
            requests,
            loaded=loaded,
            config=config,
            name=name,
            on=on,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            checkpoint_every=checkpoint_every,
            progress=progress,
            stats_progress=stats_progress,
            stop_after=stop_after,
        )


def _create(
    requests: list[EditRequest],
    *,
    loaded: LoadedModel,
    config: EditConfig,
    name: str,
    on: Sequence[PatchSource],
    checkpoint_dir: str | os.PathLike[str] | None,
    resume: bool,
    checkpoint_every: int,
    progress: Progress | None,
    stats_progress: StatsProgress | None,
    stop_after: int | None,
) -> Patch:
    """:func:`create_patch` once its arguments are checked, with the model in its inference state."""
    parents = resolve_patches(on)
    check_lineage(parents)  # before any work: a chain is given whole, oldest first
    check_corpus(config.stats_corpus)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_resident(model)  # C0 sampling and the edit read every weight
    stack = PatchStack.for_model(model)
    if stack.applied:
        raise InvalidRequestError(
            "the model already has patches applied; pass them as parents (on=...) instead"
        )

    spec = spec_for_model(model)
    num_layers = len(decoder_layers(model, spec))
    layers = list(config.layers) if config.layers else spec.default_layers(num_layers)
    problem = check_edited_layers(layers, num_layers, subject_last=all(r.subject_last for r in requests))
    if problem:
        raise InvalidRequestError(problem)
    prefix_room = config.prefix_tokens + 4 if config.n_prefixes else 0  # re-tokenized, a prefix grows a bit
    limit = context_length(model)
    check_fits(requests, tokenizer, limit, scored=False, reserve=prefix_room)
    check_fits(requests, tokenizer, limit)  # and what eval scores: no patch whose own facts eval refuses
    for i, token in split_subjects(tokenizer, requests)[:5]:
        logger.warning(
            "record %d: the subject %r ends inside the token %r of %r; the edit is keyed at that token, so it "
            "binds to the longer word (write the prompt so the subject ends a word)",
            i,
            requests[i].subject,
            token,
            requests[i].text,
        )
    try:  # parents made on other weights fail here, before any warning or minutes of statistics
        for p in parents:
            stack.apply(p)
    finally:
        stack.unload_all()  # bit-exact: the statistics and the fingerprint are the base's
    past_keys = parent_key_rows(parents, model, layers)
    stateless = [p.name for p in parents if not p.state]
    if stateless:
        logger.warning(
            "parent(s) %s carry no key state (made by another method or tool): this run does not protect "
            "their edits",
            ", ".join(stateless),
        )
    uncovered = [l for l in layers if l not in past_keys]
    if parents and uncovered and not stateless:
        logger.warning(
            "layers %s hold no keys of the parents' edits (they edited other layers), so what this run changes "
            "there does not protect them; editing the parents' layers (see `inspect`) keeps them",
            uncovered,
        )
    base_fingerprint = model_fingerprint(model)  # weights and dtype, before the parents go on
    key = run_key(requests, config, parents, base_fingerprint)
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is not None and (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise InvalidRequestError(
            f"{folder} is a file where the run keeps its checkpoint folder: move it away"
        )
    if folder is not None and not resume:
        refuse_interrupted_run(folder, key, len(requests))  # a finished run of the same key may go again
    if folder is not None and resume:
        check_run_key(folder, key)  # another run's checkpoint: refused before minutes of statistics
    stats = load_statistics(model, tokenizer, layers, [config], progress=stats_progress)
    fingerprints: dict[str, str | None] = {spec.weight_name(l): None for l in layers}
    for p in parents:
        stack.apply(p)
    try:
        params = dict(model.named_parameters())
        fingerprints = {n: tensor_fingerprint(params[n]) for n in fingerprints}
        editor = Editor(
            model,
            tokenizer,
            config.with_overrides(layers=tuple(layers)),
            c0=stats.c0,
            past_keys=past_keys,
            c_first=stats.c_first,
            bank=stats.bank,
        )
        start = 0
        if folder is not None and resume:
            restored = load_checkpoint(folder, key, len(requests))
            if restored is not None:
                start, tensors, records = restored
                try:
                    editor.load_state(tensors, records)
                except (KeyError, ValueError) as exc:  # tensors missing, misshapen or not finite
                    raise damaged_checkpoint(folder, exc) from exc
                logger.info("resuming at request %d of %d", start, len(requests))
        step = config.batch_size if config.mode == "batch" else 1
        since_checkpoint = 0
        if progress:
            progress(start, len(requests))
        for s in range(start, len(requests), step):
            chunk = list(requests[s : s + step])
            editor.edit(chunk, s)
            since_checkpoint += len(chunk)
            done = s + len(chunk)
            if progress:
                progress(done, len(requests))
            if folder is not None and (since_checkpoint >= checkpoint_every or done == len(requests)):
                save_checkpoint(folder, editor, done, key)
                since_checkpoint = 0
            if stop_after is not None and done >= stop_after and done < len(requests):
                if folder is not None:
                    save_checkpoint(folder, editor, done, key)
                editor.release()
                raise KeyboardInterrupt(f"stopped after {done} requests")
        final = target_probabilities(
            model, tokenizer, [r.text for r in requests], [r.target_new for r in requests]
        )
        final_true = target_probabilities(
            model,
            tokenizer,
            [r.text for r in requests if r.target_true],
            [r.target_true for r in requests if r.target_true],
        )
        deltas = editor.final_deltas()
        keys_state = editor.chain_state()
    finally:
        stack.unload_all()
    true_iter = iter(final_true.tolist())
    metrics = []
    for rec, p_final, r in zip(editor.records, final.tolist(), requests, strict=True):
        m = rec.to_json()
        m["p_new_final"] = p_final
        if r.target_true:
            m["p_true_final"] = next(true_iter)
        metrics.append(m)
    deltas = tuple(
        type(d)(
            name=d.name,
            shape=d.shape,
            neuron_axis=d.neuron_axis,
            indices=d.indices,
            delta=d.delta,
            original=d.original,
            fingerprint=fingerprints.get(d.name),
        )
        for d in deltas
    )
    manifest = Manifest(
        name=name,
        base_model={**loaded.info.to_json(), "edited_layers": layers},
        method={
            "name": config.method,
            "config": config.resolved().with_overrides(layers=tuple(layers)).to_json(),
            "prefixes": editor.prefixes,
            "tool_version": __version__,
        },
        requests=[r.to_json() for r in requests],
        metrics=metrics,
        parents=[ParentRef(p.name, p.id) for p in parents],
    )
    return Patch(manifest=manifest, deltas=deltas, state=keys_state)
