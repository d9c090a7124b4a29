"""Settings of the NMKE editing engine (and of its dense baselines AlphaEdit and MEMIT).

Every constant of the method is a field here, with its default and meaning; see ``docs/method.md`` (the
pipeline, and where the defaults differ from the NMKE, AlphaEdit and MEMIT papers, and why).
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ...errors import InvalidRequestError

Method = Literal["nmke", "alphaedit", "memit"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """``value`` as the type of field ``name`` (an int for a float field becomes a float, so ``--set x=30``
    and ``x=30.0`` are the same setting and the same run key); anything else of the wrong type is refused."""
    if value is None and ("None" in annotation or name == "layers"):
        return None
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy numbers too
    if name == "layers":
        if isinstance(value, list | tuple) and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in value
        ):
            return tuple(int(x) for x in value)
    elif annotation.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif annotation.startswith("int"):
        if number and (isinstance(value, numbers.Integral) or float(value).is_integer()):
            return int(value)  # range checks follow in EditConfig
    elif annotation.startswith("float"):
        if number:
            return float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        return value
    if isinstance(value, str) and annotation.startswith(("int", "float")):
        try:
            parsed = float(value)
        except ValueError:
            parsed = 0.0
        if not math.isfinite(parsed):
            raise InvalidRequestError(f"invalid config: {name} must be a finite number (got {value!r})")
    expected = (
        "one of " + ", ".join(map(str, _choices()[name]))
        if name in _choices()
        else annotation.split(" = ")[0]
    )
    raise InvalidRequestError(f"invalid config: {name} must be {expected} (got {value!r})")


# Largest whole-number setting accepted (stats_tokens, z_steps, ...): beyond it a value is a typo, not a run.
MAX_INT_SETTING = 10**9

# Fields added after configs were first written, with the value a config written without them meant.
ADDED_FIELDS: dict[str, Any] = {
    "z_optimizer": "adam",
    "z_step": 0.08,
    "z_momentum": 0.5,
    "z_stop_bare": False,
    "key_columns": "mean",
    "bare_weight": 0.5,
    "first_token_weight": 0.0,
    "contrast_words": False,
    "contrast_subject_first": False,
    "contrast_keep": 0.0,
    "stats_prefix": "",
    "contrast_bank": 0,
    "bank_size": 4096,
    "contrast_score": 0.0,
    "contrast_first": "embedding",
    "past_weight": 1.0,
    "grow_budget_to": None,
    "sink_ratio": None,
    "contrast_decay": 1.0,
    "z_stop_whole": False,
}
# NMKE's own target-value and key settings; the dense baselines run as published (see EditConfig.resolved).
NMKE_ONLY = (
    "z_optimizer",
    "z_step",
    "z_momentum",
    "z_stop_bare",
    "z_stop_whole",
    "key_columns",
    "bare_weight",
    "first_token_weight",
    "contrast_words",
    "contrast_subject_first",
    "contrast_keep",
    "contrast_decay",
    "contrast_bank",
    "bank_size",
    "contrast_score",
    "contrast_first",
    "grow_budget_to",
    "past_weight",
    "sink_ratio",
)

# NMKE's mask, attribution and masked solve: the dense baselines read none of these either.
NMKE_MASK_AND_SOLVE = (
    "max_neurons",
    "neuron_score",
    "reuse_touched",
    "masked_solve",
    "amplification",
    "attribution_vocab",
    "temperature",
    "ratio_min",
    "ratio_max",
    "landing",
    "min_preservation",
    "contrast_subjects",
    "contrast_weight",
    "max_sweeps",
)


@functools.cache
def _choices() -> dict[str, tuple[Any, ...]]:
    """The allowed values of every ``Literal`` field of :class:`EditConfig`."""
    out = {}
    for name, hint in get_type_hints(EditConfig).items():
        members = (
            (hint,) if get_origin(hint) is Literal else get_args(hint)
        )  # a Literal, or a union's members
        for member in members:
            if get_origin(member) is Literal:
                out[name] = get_args(member) + ((None,) if type(None) in members else ())
    return out


@dataclass(frozen=True)
class EditConfig:
    """All settings of one ``create`` run. Frozen; use :meth:`with_overrides` to change fields."""

    method: Method = _f(
        "nmke", "nmke (sparse masked), alphaedit (dense, null-space) or memit (dense, no projector)."
    )
    layers: tuple[int, ...] | None = _f(
        None, "Edited layers (consecutive, ascending); None = the architecture default."
    )
    # [1] target values z
    z_optimizer: Literal["adam", "normalized"] = _f(
        "normalized",
        "normalized: fixed-length steps of z_step * ||h|| along the unit gradient (with momentum "
        "z_momentum): about half Adam's steps and a ~30% shorter delta on the default model; adam: the "
        "reference (z_lr). NMKE only: the baselines use Adam.",
    )
    z_lr: float = _f(0.5, "Adam learning rate of the residual delta.")
    z_step: float = _f(0.08, "normalized: length of each step as a fraction of ||h||.")
    z_momentum: float = _f(0.5, "normalized: weight of the previous direction in the next one.")
    z_steps: int = _f(20, "Maximum optimisation steps per target value.")
    z_stop_prob: float = _f(
        0.75,
        "Early stop once the mean target probability over the prompts exceeds this. 0.75 rather than 0.9: "
        "smaller residuals, fewer steps; over 100 edits efficacy 0.90 vs 0.88, perplexity drift +18% vs +22% "
        "(BENCHMARKS.md).",
    )
    z_stop_whole: bool = _f(
        False,
        "Early stop on the whole target's probability (the product over its tokens, what P(new) reports) "
        "instead of the geometric mean per token: a target of n tokens then stops at z_stop_prob, not at "
        "about z_stop_prob^n (0.24 for 5 tokens at 0.75). NMKE only.",
    )
    z_stop_bare: bool = _f(
        True,
        "Stop only once the bare prompt (the request as written) passes z_stop_prob too, not just the mean "
        "over the prefixed variants: a subject at the very start of a prompt can lag far behind them. "
        "NMKE only.",
    )
    z_weight_decay: float = _f(0.5, "Weight of ||delta||^2 / ||h||^2 in the loss.")
    z_clamp_norm: float = _f(0.75, "||delta|| is clamped to this factor times ||h|| after every step.")
    z_kl_factor: float = _f(0.0625, "Weight of KL(original || edited) on '{subject} is a'.")
    n_prefixes: int = _f(5, "Context prefixes sampled from the model (z, keys and attribution use them).")
    prefix_tokens: int = _f(10, "Length of each context prefix, in tokens.")
    # [2] keys
    key_columns: Literal["mean", "contexts"] = _f(
        "contexts",
        "mean: one key per request, the mean of the bare prompt's key and the prefixed prompts' mean key "
        "(the reference's average). contexts: two, the bare "
        "prompt's and the mean of the prefixed ones, each fitted to its own residual with weights "
        "bare_weight and 1 - bare_weight. A subject at the very start of a prompt has a key unlike its "
        "prefixed ones (the first token of a text is special), so the mean fits neither. NMKE only.",
    )
    bare_weight: float = _f(0.5, "contexts: weight of the bare prompt's key column (the rest: prefixed).")
    sink_ratio: float | None = _f(
        8.0,
        "Guard for a subject that is a text's first token where that position is the attention sink (the "
        "same key for every text, and at SmolLM2-135M's layer 11 hundreds of times longer than a prefixed subject's), whose output change "
        "reaches every text. At a layer where the bare prompt's key is more than this many times as long as "
        "the mean length of the same subject's keys after a context prefix, that column is left out and the other "
        "edited layers realise its residual; where the bare prompt's output at the last edited layer is more than "
        "this many times the prefixed prompts' median output length, z's step and clamp are sized by that median "
        "instead. Needs key_columns='contexts' and n_prefixes > 0 (otherwise there is nothing to compare with and "
        "the guard is off). None = never. At 8, on the default model, "
        "layers 7-11 went from wrecked (perplexity drift +6e19% after 100 edits) to +4.5%, and the default layers 4-8 "
        "(where such keys reach 3.8 times) gave the same result as None, digit for digit (BENCHMARKS.md). "
        "NMKE only.",
    )
    # [3] attribution
    amplification: float = _f(30.0, "Amplification A of a neuron's contribution in the attribution score.")
    attribution_vocab: int = _f(
        2048,
        "Tokens (top by base logit, per prompt, plus the answer) over which the "
        "attribution log-softmax is taken; 0 = the whole vocabulary (exact, slower).",
    )
    # [4] entropy-guided ratios
    temperature: float = _f(30.0, "Softmax temperature alpha of the knowledge-general entropy.")
    ratio_min: float = _f(0.3, "Lower mask-ratio bound b.")
    ratio_max: float = _f(0.4, "Upper mask-ratio bound c.")
    # [5] mask and sparsity budget
    max_neurons: float | None = _f(
        0.1,
        "Sparsity budget: at most this fraction of a layer's neurons per edit "
        "(None = the published mask size). NMKE only: the dense baselines change every neuron.",
    )
    grow_budget_to: float | None = _f(
        None,
        "An edit whose P(new) stays below `sweep_until` after its sweeps is solved again from the model "
        "before it on twice the neurons per layer (the next of its mask, by rank), until it lands or its "
        "budget reaches this fraction (None = never). Late in a lifelong run the past edits' keys fill the "
        "budgeted neurons and new edits stop landing (benchmarks/probe_decay.py). NMKE only.",
    )
    neuron_score: Literal["hybrid", "specificity", "combined"] = _f(
        "specificity",
        "How budgeted neurons are ranked within the hybrid mask: 'specificity' (default) = by k_i^2 / C0_ii, "
        "how strongly the subject drives a neuron relative to its activity on preserved text, which is what "
        "makes the 'soft' solve cheap in drift (BENCHMARKS.md: at T=20 ppl drift +1.4% vs +6.4%); 'hybrid' = "
        "by the better of the neuron's knowledge-general and knowledge-specific attribution ranks; 'combined' = "
        "the sum of both ranks.",
    )
    reuse_touched: float = _f(
        0.0,
        "Lifetime footprint: neurons already changed by earlier edits move up the budget ranking by this much "
        "(ranks run from 0 to 1; 0 = off, 1 = any touched neuron in the mask comes before any untouched one).",
    )
    masked_solve: Literal["soft", "exact", "post"] = _f(
        "soft",
        "How NMKE solves on the selected neurons. 'soft' (default): least squares on the selected neurons "
        "with the change on preserved text, tr(X^T C0 X), weighted as heavily as still lands `landing` of "
        "the edit; 'exact': the null space of C0 restricted to the selected neurons (few directions left: "
        "updates blew up or did not land over 30 edits); 'post' = reference: solve densely, zero the "
        "unselected rows (destroys efficacy at a 10% budget).",
    )
    # [6] null-space projector
    projector_energy: float = _f(
        0.02,
        "Null space = eigenvectors of C0 with the smallest eigenvalues holding at "
        "most this share of the trace (a relative rule that transfers between models).",
    )
    first_token_weight: float = _f(
        0.0,
        "Preserved first-token keys: C0 + first_token_weight * E[k k^T] of keys at a text's first position, "
        "tokens drawn as often as they occur in the preservation text (0 = off). Every later token reads "
        "the first one, so a change there reaches the whole text. NMKE only.",
    )
    stats_tokens: int = _f(20000, "Tokens of preservation text for the key statistics C0.")
    stats_prefix: str = _f(
        "From Wikipedia, the free encyclopedia\n\n",
        "Model-sampled preservation text continues this header (not counted itself), so it reads like an "
        "encyclopedia, dense in named entities, as the Wikipedia text of MEMIT/AlphaEdit's statistics: over "
        "100 dev edits neighbour agreement 0.61 -> 0.66, unrelated-fact retention 0.56 -> 0.68, drift +4.9% -> "
        "+3.4% at equal efficacy (BENCHMARKS.md). '' = continuations of plain sentence openings (before).",
    )
    stats_corpus: str | None = _f(
        None,
        "Text file(s) for C0, several joined with os.pathsep (':' on Linux), or 'dataset:NAME?config=..&split=.."
        "&field=..&revision=..' (datasets.load_dataset, streamed; nmke_patch/dataset_corpus.py); None = text "
        "sampled from the model.",
    )
    # [7] solve
    lambda_reg: float = _f(
        1.0,
        "Ridge term lambda of the AlphaEdit solve and of NMKE's 'exact'/'post' solves (in units of the mean "
        "C0 diagonal). With NMKE 'exact' at a 10% budget, 1 wrecked the model within 30 sequential edits; "
        "10 and 100 traded efficacy for health (BENCHMARKS.md).",
    )
    landing: float = _f(
        0.9,
        "'soft' masked solve: share of each layer's residual the update must realise (the weighted mean over "
        "the batch's key columns); the preservation weight is the largest that reaches it.",
    )
    min_preservation: float = _f(
        100.0,
        "'soft' solve: floor on the preservation weight mu (0 = none). An edit that would need a smaller mu "
        "(more change on preserved text) lands less instead; a per-edit drift cap. Over 100 dev edits: "
        "30 (first edits chose mu of about 25-600) took drift from +17.8% to +8.3% (session 2); 100 from "
        "+8.3% to +4.9% at equal efficacy 0.99 (BENCHMARKS.md).",
    )
    contrast_subjects: int = _f(
        32,
        "NMKE: per request, the model's most likely alternatives for the subject in its prompt (top next "
        "tokens after the text before the subject) whose keys the solve must keep (0 = off). Keeps an edit of "
        "one subject from carrying over to similar subjects in the same context.",
    )
    contrast_subject_first: bool = _f(
        True,
        "Contrast a subject that opens the prompt too, with the tokens nearest its first token in the input "
        "embedding (no text precedes it to predict alternatives from; a text's first key depends on its "
        "token alone). Over 100 edits: perplexity drift +8.3% instead of +11.1%, the rest equal. NMKE only.",
    )
    contrast_first: Literal["embedding", "list"] = _f(
        "embedding",
        "contrast_subject_first: where the look-alikes of a subject opening the prompt come from. embedding: "
        "the tokens nearest its first token, each alone; list: the names the model lists after it "
        "('Vancouver,' -> Toronto, Seattle), completed to whole words and keyed at their last token at the "
        "start of a text, as the subject is (a multi-token name is keyed after its first token, where a "
        "lone first token is not like it). NMKE only.",
    )
    contrast_words: bool = _f(
        False,
        "Contrast subjects shaped like the edited one: candidates capitalised when the subject is, each "
        "completed greedily to a whole word (up to 3 more tokens) and keyed at its last token, as the "
        "subject is. Multi-token names end in tokens ('aka' of Osaka) whose keys share a 'name ending "
        "here' direction that single-token candidates do not cover. NMKE only.",
    )
    contrast_weight: float = _f(
        0.1,
        "Weight of each contrast key, in units of one edited key. 0.1 kept the single-edit neighbours as well "
        "as 1 did, with less perplexity drift over 100 edits (+22% vs +32%, BENCHMARKS.md).",
    )
    contrast_score: float = _f(
        0.0,
        "specificity ranking: a neuron's preserved-text activity C0_ii is joined by this times its mean "
        "squared activity on the contrast subjects' keys, so the budget goes to neurons that tell the "
        "edited subject apart from its look-alikes, not to ones all subjects of the prompt share (0 = off).",
    )
    contrast_bank: int = _f(
        0,
        "NMKE: per request and layer, this many keys of the preserved text most like the subject's key on the "
        "selected neurons (cosine; from a bank of `bank_size` keys) join the contrast keys (0 = off): "
        "the text an edit would carry over to most.",
    )
    bank_size: int = _f(4096, "Keys of the preserved text kept per layer for `contrast_bank` (float16).")
    contrast_keep: float = _f(
        0.0,
        "Share of each edit's contrast weight kept in C_past, so later edits keep earlier edits' contrast "
        "subjects too (0 = off). Travels with the patch (state `contrast.<layer>`) to `--on` children.",
    )
    contrast_decay: float = _f(
        1.0,
        "Factor applied to the kept contrast statistics (`contrast_keep`) at every later edit, so an edit's "
        "look-alikes are protected for about 1 / (1 - decay) edits and old ones stop competing with new "
        "edits (1 = kept for good). Within one run; what parents (`--on`) kept enters as they wrote it.",
    )
    past_weight: float = _f(
        1.0,
        "Weight of the past edits' keys (C_past) in NMKE's soft solve, in units of the edit's own key. "
        "Past keys pile up: after T edits a new key competes with T of them, so edits land less as T grows "
        "(benchmarks/probe_decay.py); below 1 they land more at the risk of moving earlier edits. NMKE only.",
    )
    max_sweeps: int = _f(
        1,
        "Passes over the edited layers per batch: another pass (from the edited model) runs while a request's "
        "P(new) on its prompt is below `sweep_until`. 1 = the reference single pass (the dense baselines "
        "always make one). 3 raised efficacy over 100 edits from 0.88 to 0.94 but perplexity drift from +22% "
        "to +40% (BENCHMARKS.md).",
    )
    sweep_until: float = _f(0.5, "P(target_new | prompt) each request should reach before sweeps stop.")
    memit_lambda: float = _f(15000.0, "MEMIT's C0 weight lambda2.")
    # lifelong
    mode: Literal["sequential", "batch"] = _f(
        "sequential", "sequential: one edit at a time; batch: batch_size at once."
    )
    batch_size: int = _f(1, "Requests per solve in batch mode (the CLI's --mode batch defaults to 10).")
    seed: int = _f(0, "Seed for prefix sampling and preservation text.")

    def __post_init__(self) -> None:
        for f in fields(self):  # built directly, not through with_overrides: the same type rules
            value = getattr(self, f.name)
            coerced = _coerce(f.name, str(f.type), value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                allowed = ", ".join(map(str, choices))
                raise InvalidRequestError(
                    f"invalid config: {name} must be one of {allowed} (got {getattr(self, name)!r})"
                )
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and not isinstance(value, int) and not math.isfinite(value):  # ints are finite
                raise InvalidRequestError(f"invalid config: {f.name} must be a finite number (got {value!r})")
            whole = str(f.type).startswith("int") and f.name != "seed"
            if whole and number and not -MAX_INT_SETTING <= value <= MAX_INT_SETTING:
                raise InvalidRequestError(
                    f"invalid config: {f.name} must be between -{MAX_INT_SETTING:,} and {MAX_INT_SETTING:,} "
                    f"(got {value:,})"
                )
        checks = [
            (self.z_steps >= 1 and self.z_lr > 0, "z_steps must be >= 1 and z_lr > 0"),
            (
                self.z_clamp_norm > 0 and self.z_weight_decay >= 0 and self.z_kl_factor >= 0,
                "z_clamp_norm must be > 0, z_weight_decay and z_kl_factor >= 0",
            ),
            (self.z_stop_prob > 0, "z_stop_prob must be > 0 (above 1: never stop early)"),
            (
                self.amplification > 0 and self.temperature > 0 and self.attribution_vocab >= 0,
                "amplification and temperature must be > 0, attribution_vocab >= 0",
            ),
            (self.lambda_reg >= 0 and self.memit_lambda >= 0, "lambda_reg and memit_lambda must be >= 0"),
            (self.z_step > 0 and 0 <= self.z_momentum < 1, "z_step must be > 0 and z_momentum in [0, 1)"),
            (self.stats_tokens >= 1, "stats_tokens must be >= 1"),
            (0 < self.bare_weight < 1, "bare_weight must be in (0, 1)"),
            (0 < self.ratio_min <= self.ratio_max <= 1, "need 0 < ratio_min <= ratio_max <= 1"),
            (
                self.max_neurons is None or 0 < self.max_neurons <= 1,
                "max_neurons must be a fraction in (0, 1]",
            ),
            (0 < self.projector_energy < 1, "projector_energy must be in (0, 1)"),
            (0 < self.landing < 1, "landing must be in (0, 1)"),
            (self.reuse_touched >= 0, "reuse_touched must be >= 0"),
            (self.first_token_weight >= 0, "first_token_weight must be >= 0"),
            (self.past_weight > 0, "past_weight must be > 0"),
            (self.sink_ratio is None or self.sink_ratio > 0, "sink_ratio must be > 0"),
            (
                self.grow_budget_to is None or 0 < self.grow_budget_to <= 1,
                "grow_budget_to must be a fraction in (0, 1]",
            ),
            (self.min_preservation >= 0, "min_preservation must be >= 0"),
            (
                min(
                    self.contrast_subjects,
                    self.contrast_weight,
                    self.contrast_keep,
                    self.contrast_bank,
                    self.contrast_score,
                )
                >= 0
                and self.bank_size >= 1,
                "contrast_subjects, contrast_weight, contrast_keep, contrast_bank and contrast_score must be >= 0 "
                "and bank_size >= 1",
            ),
            (0 < self.contrast_decay <= 1, "contrast_decay must be in (0, 1]"),
            (self.contrast_keep <= 1, "contrast_keep must be a share in [0, 1]"),
            (
                self.grow_budget_to is None
                or self.method != "nmke"  # the dense methods have no budget to grow
                or self.max_neurons is None
                or self.grow_budget_to >= self.max_neurons,
                "grow_budget_to must be at least max_neurons (it is the budget an edit grows to)",
            ),
            (self.max_sweeps >= 1 and 0 <= self.sweep_until <= 1, "max_sweeps >= 1, sweep_until in [0, 1]"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (self.n_prefixes >= 0 and self.prefix_tokens >= 1, "n_prefixes >= 0 and prefix_tokens >= 1"),
            (
                self.layers is None
                or (
                    len(self.layers) > 0
                    and self.layers[0] >= 0
                    and list(self.layers) == list(range(self.layers[0], self.layers[0] + len(self.layers)))
                ),
                "layers must be consecutive, ascending and >= 0 (e.g. 4,5,6 or 4-8)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                named = [f.name for f in fields(self) if re.search(rf"\b{f.name}\b", message)]
                given = ", ".join(f"{n}={getattr(self, n)!r}" for n in named)
                raise InvalidRequestError(f"invalid config: {message} (got {given})")

    @property
    def dense(self) -> bool:
        return self.method != "nmke"

    def unused(self, names: Iterable[str]) -> dict[str, str]:
        """Those of ``names`` (config fields) that these settings never read, each with the reason, so a
        setting given for them would silently do nothing: NMKE's settings under a dense baseline, MEMIT's
        weight under the others, the null-space settings where no null space is taken, the soft solve's
        where it is not the solve, one optimizer's settings under the other, and so on."""
        why: dict[str, str] = {}
        if self.dense:
            why |= dict.fromkeys((*NMKE_ONLY, *NMKE_MASK_AND_SOLVE), "NMKE only")
            if self.method == "memit":
                why |= dict.fromkeys(("projector_energy", "lambda_reg"), "MEMIT takes no null space")
            else:
                why["memit_lambda"] = "MEMIT only"
        else:
            why["memit_lambda"] = "MEMIT only"
            if self.masked_solve == "soft":
                why |= dict.fromkeys(
                    ("projector_energy", "lambda_reg"), "masked_solve 'exact' or 'post' only (this is 'soft')"
                )
            else:
                why |= dict.fromkeys(
                    ("landing", "min_preservation"),
                    f"masked_solve 'soft' only (this is {self.masked_solve!r})",
                )
            if self.z_optimizer == "normalized":
                why["z_lr"] = "z_optimizer 'adam' only (this is 'normalized')"
            else:
                why |= dict.fromkeys(
                    ("z_step", "z_momentum"), "z_optimizer 'normalized' only (this is 'adam')"
                )
            if self.key_columns == "mean":
                why["bare_weight"] = "key_columns 'contexts' only (this is 'mean')"
            if self.max_neurons is None:
                why |= dict.fromkeys(
                    ("neuron_score", "reuse_touched", "contrast_score", "grow_budget_to"),
                    "a neuron budget only (max_neurons is None: the whole mask is edited, in no order)",
                )
            elif self.neuron_score == "hybrid":
                why["contrast_score"] = "neuron_score 'specificity' or 'combined' only (this is 'hybrid')"
            if self.contrast_bank == 0:
                why["bank_size"] = "contrast_bank > 0 only"
            if self.contrast_keep == 0:
                why["contrast_decay"] = "contrast_keep > 0 only"
            if self.contrast_subjects == 0:
                why |= dict.fromkeys(
                    ("contrast_words", "contrast_first", "contrast_subject_first"),
                    "contrast_subjects > 0 only",
                )
                if self.contrast_bank == 0:
                    why |= dict.fromkeys(
                        ("contrast_weight", "contrast_keep", "contrast_decay", "contrast_score"),
                        "no contrast keys (contrast_subjects and contrast_bank are 0)",
                    )
            if self.n_prefixes == 0:
                why["bare_weight"] = "no context prefixes (n_prefixes is 0)"
        if self.n_prefixes == 0:
            why["prefix_tokens"] = "no context prefixes (n_prefixes is 0)"
        if self.stats_corpus is not None:
            why["stats_prefix"] = "text sampled from the model only (stats_corpus is set)"
        return {n: why[n] for n in sorted(names) if n in why}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    def with_overrides(self, **kw: Any) -> EditConfig:
        known = {f.name for f in fields(self)}
        unknown = set(kw) - known
        if unknown:
            raise InvalidRequestError(f"unknown config fields: {sorted(unknown)}")
        types = {f.name: str(f.type) for f in fields(self)}
        kw = {k: _coerce(k, types[k], v) for k, v in kw.items()}
        return replace(self, **kw)

    def resolved(self) -> EditConfig:
        """The settings that actually run: the dense baselines ignore :data:`NMKE_ONLY` (as published)."""
        if self.method == "nmke":
            return self
        return replace(self, **{k: ADDED_FIELDS[k] for k in NMKE_ONLY})

    def identity(self) -> dict[str, Any]:
        """:meth:`resolved` as JSON without the :data:`ADDED_FIELDS` that hold the value their absence
        meant, so run keys of configs written before those fields existed stay valid."""
        data = self.resolved().to_json()
        return {k: v for k, v in data.items() if k not in ADDED_FIELDS or ADDED_FIELDS[k] != v}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EditConfig:
        """A config from :meth:`to_json` output; a field added later takes the value its absence meant."""
        known = {f.name for f in fields(cls)}
        return cls().with_overrides(**{**ADDED_FIELDS, **{k: v for k, v in data.items() if k in known}})
