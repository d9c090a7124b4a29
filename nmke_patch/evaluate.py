"""Evaluation of a (patched) model: edit metrics, model health and the footprint of patches.

Metrics follow CounterFact (Meng et al., 2022, "Locating and Editing Factual Associations in GPT":
efficacy, paraphrase and neighbourhood scores and magnitudes, n-gram-entropy fluency) and ZsRE as used by
MEND/MEMIT/AlphaEdit (teacher-forced token accuracy). Every metric is defined in ``docs/evaluation.md``.

:func:`evaluate` measures one model as it is; :func:`compare` turns a base and a patched result into
drift figures (neighbourhood agreement, perplexity drift, unrelated-fact retention) and the footprint of
the patches; :func:`evaluate_pair` does both for a base model and a list of patches. The pieces live in
:mod:`~nmke_patch.scoring` (teacher-forced scoring), :mod:`~nmke_patch.health` (fluency, perplexity, the
packaged texts and facts) and :mod:`~nmke_patch.footprint`; their public names are importable from here
too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .consistency import warn_conflicts
from .delta import TensorDelta
from .errors import InvalidRequestError, PatchMismatchError
from .footprint import footprint, layer_index
from .health import (
    as_unrelated,
    greedy_generate,
    load_heldout,
    load_unrelated,
    ngram_entropy,
    perplexity,
    words,
)
from .inference import in_inference_state
from .lengths import check_facts_fit, check_fits, context_length, fitting_facts
from .patch import Patch
from .requests import EditRequest, Neighbor, RequestsLike, as_requests
from .scoring import Scores, score_targets
from .sources import PatchSource, resolve_patches
from .stack import PatchStack, check_lineage

__all__ = [
    "EVAL_VERSION",
    "METRICS",
    "Scores",
    "compare",
    "evaluate",
    "evaluate_pair",
    "footprint",
    "greedy_generate",
    "layer_index",
    "load_heldout",
    "load_unrelated",
    "ngram_entropy",
    "packaged_unrelated",
    "perplexity",
    "score_targets",
    "words",
]

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

EVAL_VERSION = 3
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


def _fitted(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    unrelated: Sequence[Neighbor],
    *,
    packaged: bool,
) -> list[Neighbor]:
    """Refuse a scored prompt that, with its answer, does not fit the model's context (one error naming
    it). Of the packaged unrelated-fact set, the facts that fit (a warning says how many do not); facts the
    caller gave must all fit."""
    limit = context_length(model)
    check_fits(requests, tokenizer, limit)
    if not packaged:
        check_facts_fit(unrelated, tokenizer, limit, "unrelated facts")
        return list(unrelated)
    kept = fitting_facts(unrelated, tokenizer, limit)
    if len(kept) < len(unrelated):
        logger.warning(
            "%d of the %d packaged unrelated facts do not fit this model's %s positions with their answers; "
            "retention uses the other %d",
            len(unrelated) - len(kept),
            len(unrelated),
            limit,
            len(kept),
        )
    return kept


def packaged_unrelated(model: nn.Module, tokenizer: Any) -> list[Neighbor]:
    """The packaged unrelated-fact set, less the facts too long for ``model`` (a warning says how many)."""
    return _fitted(model, tokenizer, [], load_unrelated(), packaged=True)


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


@in_inference_state  # dropout off whatever mode the user's model is in; restored afterwards
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    requests: RequestsLike,
    *,
    heldout_text: str | Sequence[str] | None = None,
    unrelated: str | os.PathLike[str] | Sequence[Neighbor | dict[str, str]] | None = None,
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
        unrelated: facts for retention (:class:`Neighbor` or ``{"prompt", "target"}`` objects, or a JSONL
            file of them); ``None`` = the packaged unrelated-fact set; empty = skip.
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
    packaged = unrelated is None
    unrelated = _fitted(model, tokenizer, requests, as_unrelated(unrelated), packaged=packaged)
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
        gen_prompts = [r.text for r in requests[:generations]]
        gen_prompts += list(FLUENCY_PROMPTS[: max(0, generations - len(gen_prompts))])
        if len(gen_prompts) < generations:  # greedy: a prompt used twice would give the same text twice
            logger.warning(
                "%d generations asked, but there are only %d distinct prompts (the records' edit prompts and %d "
                "fixed ones): %d made",
                generations,
                len(gen_prompts),
                len(FLUENCY_PROMPTS),
                len(gen_prompts),
            )
        say(f"generating {len(gen_prompts)} x {generation_tokens} tokens")
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


def _shaped_like(cached: Any, fresh: dict[str, Any]) -> bool:
    """Whether a cached result has the fields, and the kinds of value, of a result computed now (a damaged or
    foreign cache file is evaluated again, not read into a KeyError)."""
    if not isinstance(cached, dict) or cached.keys() != fresh.keys():
        return False
    for part in ("metrics", "details", "counts"):
        mine, theirs = cached.get(part), fresh.get(part)
        if not isinstance(mine, dict) or not isinstance(theirs, dict) or mine.keys() != theirs.keys():
            return False
        if any(type(mine[k]) is not type(v) for k, v in theirs.items() if part == "details"):
            return False
    return True


def _base_cache_file(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], settings: dict[str, Any]
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
        "settings": settings,
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
    if kwargs.get("unrelated") is not None:  # a file or records: their facts (and the cache key with them)
        kwargs["unrelated"] = as_unrelated(kwargs["unrelated"])
    bound = inspect.signature(evaluate).bind(model, tokenizer, requests, **kwargs)  # TypeError: unknown
    bound.apply_defaults()  # the cache key holds every setting: given or left at its default, the same
    settings = {
        k: v for k, v in bound.arguments.items() if k not in ("model", "tokenizer", "requests", "progress")
    }
    _check_counts(**{k: v for k, v in kwargs.items() if k in inspect.signature(_check_counts).parameters})
    where = os.fspath(requests) if isinstance(requests, (str, os.PathLike)) else "facts"
    requests = as_requests(requests)
    warn_conflicts(requests, where)
    resolved = resolve_patches(patches)
    stack = PatchStack.for_model(model)
    if not force:
        check_lineage(resolved, [m.id for m in stack.merged])
    if stack.applied:
        raise InvalidRequestError("evaluate_pair needs the base model: unload the applied patches first")
    say = progress or (lambda _stage: None)
    packaged = kwargs.get("unrelated") is None
    if kwargs.get("heldout_text") is None:
        kwargs["heldout_text"] = load_heldout()
    unrelated = load_unrelated() if packaged else kwargs["unrelated"]
    kwargs["unrelated"] = _fitted(model, tokenizer, requests, unrelated, packaged=packaged)
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
    file = _base_cache_file(model, tokenizer, requests, settings) if cache else None
    base = None
    if file is not None and file.is_file():
        try:
            base = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            base = None
        if base is not None and not _shaped_like(base, patched):
            logger.warning("ignoring the damaged cached base result %s; evaluating the base again", file)
            base = None
        if base is not None:
            say("base: reusing the cached result")
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
