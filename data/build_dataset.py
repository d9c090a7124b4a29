"""Build the knowledge-edit datasets used by nmke-patch's engine, tests and benchmarks.

Everything is derived deterministically (from ``--seed``) from the hand-written entity tables in
``data/sources/entities.json`` and the relation templates below, filtered with the embedded default base
model (SmolLM2-135M-Instruct, fp32, CPU):

* a fact "subject -> answer" is *known* under a prompt template when, among all answers of its relation,
  the true answer has the highest sequence log-probability (sum of the log-probs of the tokens of
  ``" " + answer`` after the prompt) AND the greedy next token is the first token of ``" " + answer``;
* a real fact is kept when at least one of its relation's templates makes it known; the first such template
  (in the relation's order) is the record's main ``prompt``; its paraphrases are the other templates,
  those under which the true answer also ranks first coming first;
* ``target_new`` is drawn from the same relation's answers (a different answer, and a different first
  token), so ``P(target_true) > P(target_new)`` on the main prompt holds by construction;
* synthetic records use invented subjects in the same templates; their ``target_true`` is the base model's
  best answer among the relation's answers on the main prompt.

Subjects are partitioned: every subject is either edited in the dev set, edited in the bench set, or
reserved (never edited) for neighbourhood prompts and the packaged unrelated-fact set.

Outputs: ``data/counterfact_dev.jsonl``, ``data/counterfact_bench.jsonl``, ``data/README.md``,
``examples/facts.json`` and ``nmke_patch/_data/unrelated_facts.jsonl``.

Usage (from the repository root; ~9 min of CPU time on one thread, longer on a busy machine)::

    python data/build_dataset.py            # --seed 0 --threads 1; rewrites every output and data/README.md
    python data/build_dataset.py --check    # re-verify the written files with the model
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

logger = logging.getLogger("build_dataset")

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "data" / "sources" / "entities.json"

N_DEV = 200
N_BENCH = 1000
N_UNRELATED = 100
N_PARAPHRASES = 2
N_NEIGHBOURS = 3
RESERVE_SHARE = 0.2  # share of each relation's known real facts held back (by subject) as never-edited facts
MIN_RESERVE = 4  # ... but at least this many per relation (a relation with fewer known facts is reserve-only)
TOKENS_PER_BATCH = 2048


@dataclass(frozen=True)
class Relation:
    """A relation: where its facts come from and the prompt templates that ask for the answer."""

    name: str
    table: str
    column: int
    templates: tuple[str, ...]  # in order of preference for the main prompt; each has one "{}"
    synthetic: str | None = None  # kind of invented subject used for synthetic records, if any


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "capital",
        "countries",
        1,
        (
            "The capital of {} is",
            "The capital city of {} is",
            "The name of the capital of {} is",
            "In {}, the capital city is",
            "The government of {} sits in the city of",
        ),
        "country",
    ),
    Relation(
        "language",
        "countries",
        2,
        (
            "The main language spoken in {} is",
            "People in {} mostly speak",
            "The official language of {} is",
            "Most people in {} speak",
            "The language most widely spoken in {} is",
        ),
        "country",
    ),
    Relation(
        "currency",
        "countries",
        3,
        (
            "The currency of {} is the",
            "The official currency of {} is the",
            "The national currency of {} is the",
            "In {}, people pay with the",
            "The money used in {} is the",
        ),
        "country",
    ),
    Relation(
        "continent",
        "countries",
        4,
        (
            "{} is located in the continent of",
            "{} is a country in",
            "The continent where {} is located is",
            "{} is part of the continent of",
            "Geographically, {} lies in",
        ),
        "country",
    ),
    Relation(
        "state_capital",
        "us_states",
        1,
        (
            "The capital of the state of {} is",
            "The capital of {} is",
            "The state capital of {} is",
            "The capital city of the U.S. state of {} is",
            "The seat of government of {} is the city of",
        ),
    ),
    Relation(
        "city_country",
        "cities",
        1,
        (
            "{} is a city in the country of",
            "{} is a city in",
            "The city of {} is located in",
            "{} is located in the country of",
            "The city of {} is in the country of",
        ),
        "city",
    ),
    Relation(
        "landmark_city",
        "landmarks",
        1,
        (
            "{} is located in the city of",
            "Tourists visit {} in the city of",
            "You can see {} in the city of",
            "The city that is home to {} is",
            "To visit {}, you have to travel to the city of",
        ),
    ),
    Relation(
        "company_country",
        "companies",
        1,
        (
            "{} is a company from",
            "{} is headquartered in the country of",
            "The company {} is based in the country of",
            "{} was founded in the country of",
            "The headquarters of {} are in",
        ),
        "company",
    ),
    Relation(
        "founder",
        "founders",
        1,
        (
            "The founder of {} is",
            "{} was founded by",
            "The company {} was founded by",
            "The person who founded {} is",
            "{} was started by",
        ),
    ),
    Relation(
        "birth_country",
        "people",
        1,
        (
            "{} was born in the country of",
            "The country where {} was born is",
            "{} came from the country of",
            "{} is originally from",
            "{} was born in",
        ),
        "person",
    ),
    Relation(
        "occupation",
        "people",
        2,
        (
            "{} worked as a",
            "By profession, {} was a",
            "{} is best known as a",
            "{} was a famous",
            "The profession of {} was that of a",
        ),
        "person",
    ),
    Relation(
        "sport",
        "athletes",
        1,
        (
            "{} is a professional",
            "{} is a famous",
            "{} played the sport of",
            "The sport that {} played professionally is",
            "{} made a career in the sport of",
        ),
        "person",
    ),
    Relation(
        "author",
        "books",
        1,
        (
            "{} was written by",
            "The author of {} is",
            "The book {} was written by",
            "The writer of {} is",
            "{} is a book by",
        ),
    ),
    Relation(
        "painter",
        "paintings",
        1,
        (
            "{} was painted by",
            "The painter of {} is",
            "The artist who painted {} was",
            "{} is a famous painting by",
            "The painting {} is a work by",
        ),
    ),
    Relation(
        "inventor",
        "inventions",
        1,
        (
            "The inventor of {} was",
            "The person who invented {} was",
            "The credit for inventing {} goes to",
            "Historians credit the invention of {} to",
            "{} was invented by",
        ),
    ),
    Relation(
        "instrument",
        "musicians",
        1,
        (
            "{} played the",
            "{} is famous for playing the",
            "The instrument played by {} is the",
            "The musician {} played the",
            "{} was known as a master of the",
        ),
        "person",
    ),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    target: str
    synthetic: bool = False


def fill(template: str, subject: str) -> str:
    return template.replace("{}", subject)


def usable_templates(relation: Relation, subject: str) -> list[str]:
    """Templates that read well for ``subject``: one starting with the subject needs a capitalised subject."""
    return [t for t in relation.templates if not t.startswith("{}") or subject[:1].isupper()]


def load_real_facts(path: Path = SOURCES) -> tuple[list[Fact], dict[str, list[str]]]:
    """All real facts of every relation, and every relation's answer set (its candidates)."""
    tables = json.loads(path.read_text())
    facts: list[Fact] = []
    answers: dict[str, list[str]] = {}
    for rel in RELATIONS:
        rows = tables[rel.table]["rows"]
        pairs = [(row[0], row[rel.column]) for row in rows if row[rel.column] is not None]
        facts.extend(Fact(rel.name, s, t) for s, t in pairs)
        answers[rel.name] = sorted({t for _, t in pairs})
    return facts, answers


# ----------------------------------------------------------------------------------------------- scoring


class Scorer:
    """Batched, cached log-prob scoring on CPU with prompt-prefix sharing.

    A prompt is tokenized as ``tok(prompt)`` and a target as ``tok(" " + target, add_special_tokens=False)``,
    and the two are concatenated (SmolLM2's tokenizer adds no BOS). Prompts of equal token length are batched (no padding); their KV cache is then shared by
    every target continuation scored after them, so a candidate answer costs only its own tokens.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tok = tokenizer
        self._prompt_ids: dict[str, list[int]] = {}
        self._target_ids: dict[str, list[int]] = {}
        self._seq: dict[tuple[str, str], float] = {}
        self._next: dict[str, tuple[int, dict[int, float]]] = {}
        self.tokens_run = 0
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    # -- tokenization
    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_ids:
            self._prompt_ids[prompt] = list(self.tok(prompt).input_ids)
        return self._prompt_ids[prompt]

    def target_ids(self, target: str) -> list[int]:
        if target not in self._target_ids:
            self._target_ids[target] = list(self.tok(" " + target, add_special_tokens=False).input_ids)
        return self._target_ids[target]

    def first_id(self, target: str) -> int:
        return self.target_ids(target)[0]

    # -- model calls
    def run(self, jobs: Mapping[str, tuple[Iterable[int], Iterable[str]]]) -> None:
        """For each prompt: cache the greedy next token, the log-probs of the given next-token ids and the
        sequence log-probs of the given targets. Prompts with nothing new to compute are skipped."""
        todo: dict[str, tuple[list[int], list[str]]] = {}
        for prompt, (tids, targets) in jobs.items():
            seen = self._next.get(prompt, (0, {}))[1]
            new_tids = sorted({t for t in tids if t not in seen})
            new_targets = sorted({t for t in targets if (prompt, t) not in self._seq})
            if prompt not in self._next or new_tids or new_targets:
                todo[prompt] = (new_tids, new_targets)
        by_len: dict[int, list[str]] = defaultdict(list)
        for prompt in sorted(todo):
            by_len[len(self.prompt_ids(prompt))].append(prompt)
        for width, prompts in sorted(by_len.items()):
            step = max(1, TOKENS_PER_BATCH // width)
            for i in range(0, len(prompts), step):
                self._run_batch(prompts[i : i + step], todo)

    @torch.inference_mode()
    def _run_batch(self, prompts: list[str], todo: dict[str, tuple[list[int], list[str]]]) -> None:
        ids = torch.tensor([self.prompt_ids(p) for p in prompts], dtype=torch.long)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.tokens_run += ids.numel()
        last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        cache = getattr(out, "cache", None) or out.past_key_values
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        rows: list[tuple[int, str]] = []
        for b, prompt in enumerate(prompts):
            tids, targets = todo[prompt]
            greedy, known = self._next.get(prompt, (int(last[b].argmax()), {}))
            known.update({t: float(last[b, t]) for t in tids})
            known.update({self.first_id(t): float(last[b, self.first_id(t)]) for t in targets})
            self._next[prompt] = (greedy, known)
            for t in targets:
                if len(self.target_ids(t)) == 1:
                    self._seq[(prompt, t)] = known[self.first_id(t)]
                else:
                    rows.append((b, t))
        rows.sort(key=lambda bt: len(self.target_ids(bt[1])))  # similar lengths share a chunk: little padding
        for i in range(0, len(rows), 256):
            chunk = rows[i : i + 256]
            index = torch.tensor([b for b, _ in chunk], dtype=torch.long)
            tails = [self.target_ids(t)[:-1] for _, t in chunk]
            cont = torch.zeros((len(chunk), max(map(len, tails))), dtype=torch.long)
            for r, tail in enumerate(tails):
                cont[r, : len(tail)] = torch.tensor(tail)
            shared = DynamicCache()
            for layer_idx, (k, v) in enumerate(layers):
                shared.update(k[index], v[index], layer_idx)
            # Right padding comes after every real token, so no attention mask is needed; only the real
            # positions go through the LM head.
            hidden = self.model.model(input_ids=cont, **{self._cache_kw: shared}).last_hidden_state
            r_idx = torch.tensor([r for r, tail in enumerate(tails) for _ in tail], dtype=torch.long)
            j_idx = torch.tensor([j for tail in tails for j in range(len(tail))], dtype=torch.long)
            logp = torch.log_softmax(self.model.lm_head(hidden[r_idx, j_idx]).float(), dim=-1)
            self.tokens_run += len(r_idx)
            pos = 0
            for (b, t), tail in zip(chunk, tails, strict=True):
                tid = self.target_ids(t)
                rest = sum(float(logp[pos + j, tid[j + 1]]) for j in range(len(tail)))
                self._seq[(prompts[b], t)] = float(last[b, tid[0]]) + rest
                pos += len(tail)

    # -- queries (all cached)
    def greedy(self, prompt: str) -> int:
        return self._next[prompt][0]

    def bound(self, prompt: str, target: str) -> float:
        """Upper bound of the sequence log-prob: the log-prob of the target's first token."""
        return self._next[prompt][1][self.first_id(target)]

    def exact(self, prompt: str, target: str) -> float | None:
        if len(self.target_ids(target)) == 1 and prompt in self._next:
            return self._next[prompt][1].get(self.first_id(target))
        return self._seq.get((prompt, target))

    def seq_logprobs(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Sum of the log-probs of the tokens of ``" " + target`` after ``prompt``."""
        pairs = list(dict.fromkeys(pairs))
        jobs: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
        for p, t in pairs:
            jobs[p][1].append(t)
        self.run(jobs)
        return {(p, t): self._seq[(p, t)] for p, t in pairs}

    def is_top(
        self,
        items: Sequence[tuple[str, str]],
        candidates: Sequence[str],
        extra: dict[str, list[str]] | None = None,
    ) -> dict[tuple[str, str], bool]:
        """Whether ``target`` has the highest sequence log-prob among ``candidates`` after ``prompt``.

        Exact: a rival's sequence log-prob is at most its first token's log-prob, so only rivals whose first
        token beats the target's whole sequence are scored, best bound first, until one wins or none is left.
        ``extra`` targets are scored alongside in the first pass (cheap, shares the prompt's cache).
        """
        firsts = sorted({self.first_id(c) for c in candidates})
        jobs = {p: (firsts, [t, *(extra or {}).get(p, [])]) for p, t in items}
        self.run(jobs)
        result: dict[tuple[str, str], bool] = {}
        pending = list(dict.fromkeys(items))
        for chunk in (8, 10**9):
            more: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
            for p, t in pending:
                lp_t = self._seq[(p, t)]
                rivals = [c for c in candidates if c != t and self.bound(p, c) > lp_t]
                if any((e := self.exact(p, c)) is not None and e > lp_t for c in rivals):
                    result[(p, t)] = False
                    continue
                unscored = sorted(
                    (c for c in rivals if self.exact(p, c) is None), key=lambda c: -self.bound(p, c)
                )
                if not unscored:
                    result[(p, t)] = True
                    continue
                more[p][1].extend(unscored[:chunk])
            self.run(more)
            pending = [(p, t) for p, t in pending if (p, t) not in result]
        for p, t in pending:
            lp_t = self._seq[(p, t)]
            result[(p, t)] = not any((self.exact(p, c) or float("-inf")) > lp_t for c in candidates if c != t)
        return result

    def argmax(self, prompts: Sequence[str], candidates: Sequence[str]) -> dict[str, str]:
        """The candidate with the highest sequence log-prob after each prompt (exact, by bounding)."""
        firsts = sorted({self.first_id(c) for c in candidates})
        self.run({p: (firsts, []) for p in prompts})
        result: dict[str, str] = {}
        pending = list(dict.fromkeys(prompts))
        for chunk in (4, 16, 64, 10**9):
            more: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
            for p in pending:
                scored = {c: e for c in candidates if (e := self.exact(p, c)) is not None}
                best = max(scored.values(), default=float("-inf"))
                open_ = sorted(
                    (c for c in candidates if c not in scored and self.bound(p, c) > best),
                    key=lambda c: -self.bound(p, c),
                )
                if not open_:
                    result[p] = max(scored, key=lambda c: scored[c])
                else:
                    more[p][1].extend(open_[:chunk])
            self.run(more)
            pending = [p for p in pending if p not in result]
        for p in pending:
            scored = {c: e for c in candidates if (e := self.exact(p, c)) is not None}
            result[p] = max(scored, key=lambda c: scored[c])
        return result


# ------------------------------------------------------------------------------------------ synthetic names

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "l", "n", "r", "s", "th", "sk", "rn", "nd", "m", "x")
_SUFFIXES = {
    "country": ("ia", "ora", "stan", "land", "ovia", "esh", "ar", "enne"),
    "city": ("holm", "ford", "vik", "grad", "mouth", "burg", "ton", "ara"),
    "company": ("ex", "ix", "co", "tron", "", ""),
}
_COMPANY_WORDS = ("", "", " Industries", " Systems", " Motors", " Group")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def invent_subject(kind: str, rng: random.Random) -> str:
    """An invented, pronounceable name: a country, city, company ("Vornex Motors") or person ("Tarsk Kerrin")."""
    if kind == "person":
        return f"{_word(rng, rng.choice((1, 2))).capitalize()} {_word(rng, 2).capitalize()}"
    name = (_word(rng, rng.choice((1, 2))) + rng.choice(_SUFFIXES[kind])).capitalize()
    return name + rng.choice(_COMPANY_WORDS) if kind == "company" else name


# ------------------------------------------------------------------------------------------------- build


@dataclass
class TemplateView:
    """The base model on one (fact, template) prompt."""

    greedy_ok: bool  # greedy next token == first token of " " + target_true
    top: bool  # target_true has the highest sequence log-prob among the relation's answers

    @property
    def knows(self) -> bool:
        return self.greedy_ok and self.top


@dataclass
class Known:
    """A real fact the base model knows, its counterfactual target and its per-template view."""

    fact: Fact
    target_new: str
    main: str  # template
    views: dict[str, TemplateView]  # every usable template -> view

    def paraphrases(self) -> list[str]:
        """Paraphrase templates: those where the true answer also ranks first, then the rest (relation order)."""
        others = [t for t in self.views if t != self.main]
        others.sort(key=lambda t: not self.views[t].top)
        return others[:N_PARAPHRASES]


def pick_new_target(scorer: Scorer, fact: Fact, answers: Sequence[str], seed: int) -> str:
    """A different answer of the same relation, with a different first token (deterministic per fact)."""
    first = scorer.first_id(fact.target)
    options = [a for a in answers if a != fact.target and scorer.first_id(a) != first]
    return random.Random(f"{seed}|{fact.relation}|{fact.subject}").choice(options)


def view_facts(
    scorer: Scorer, facts: Sequence[Fact], answers: dict[str, list[str]], new: dict[Fact, str]
) -> dict[Fact, dict[str, TemplateView]]:
    """The base model's view of every usable template of every real fact."""
    out: dict[Fact, dict[str, TemplateView]] = {}
    for rel in RELATIONS:
        rel_facts = [f for f in facts if f.relation == rel.name]
        t0, tokens0 = time.time(), scorer.tokens_run
        items = [(fill(t, f.subject), f.target) for f in rel_facts for t in usable_templates(rel, f.subject)]
        extra = {fill(t, f.subject): [new[f]] for f in rel_facts for t in usable_templates(rel, f.subject)}
        top = scorer.is_top(items, answers[rel.name], extra)
        for f in rel_facts:
            out[f] = {}
            for t in usable_templates(rel, f.subject):
                p = fill(t, f.subject)
                out[f][t] = TemplateView(scorer.greedy(p) == scorer.first_id(f.target), top[(p, f.target)])
        logger.info(
            "%-16s %4d facts %5d prompts %7d tokens %6.1f s",
            rel.name, len(rel_facts), len(items), scorer.tokens_run - tokens0, time.time() - t0,
        )  # fmt: skip
    return out


def _contains_words(outer: str, inner: str) -> bool:
    a, b = outer.split(), inner.split()
    return any(a[i : i + len(b)] == b for i in range(len(a) - len(b) + 1))


def subject_groups(subjects: Iterable[str]) -> dict[str, str]:
    """Group subjects whose words contain one another ("Sudan" / "South Sudan"): subject -> group key.

    A group always goes to one split, so no held-out prompt ever mentions an edited subject."""
    names = sorted(set(subjects))
    parent = {s: s for s in names}

    def root(s: str) -> str:
        while parent[s] != s:
            s = parent[s]
        return s

    for a in names:
        for b in names:
            if a != b and _contains_words(a, b):
                ra, rb = root(a), root(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return {s: root(s) for s in names}


def partition_subjects(known: Sequence[Known], rng: random.Random) -> tuple[set[str], set[str], set[str]]:
    """Split subjects into (reserve, dev, bench): never edited, edited in dev, edited in bench."""
    group_of = subject_groups(k.fact.subject for k in known)
    by_group: dict[str, list[Known]] = defaultdict(list)
    for k in known:
        by_group[group_of[k.fact.subject]].append(k)
    groups = sorted(by_group)
    rng.shuffle(groups)
    per_rel = Counter(k.fact.relation for k in known)
    quota = {r: max(MIN_RESERVE, round(RESERVE_SHARE * n)) for r, n in per_rel.items()}
    reserve: set[str] = set()
    have: Counter[str] = Counter()
    # 1) reserve: fill each relation's quota, rarest relations first, so every relation has neighbours.
    for rel, _n in sorted(per_rel.items(), key=lambda kv: (kv[1], kv[0])):
        for g in groups:
            if have[rel] >= quota[rel]:
                break
            if g not in reserve and any(k.fact.relation == rel for k in by_group[g]):
                reserve.add(g)
                have.update(k.fact.relation for k in by_group[g])
    # 2) dev: about N_DEV real records, the same share of every relation's remaining facts.
    rest = [g for g in groups if g not in reserve]
    rest_per_rel = Counter(k.fact.relation for g in rest for k in by_group[g])
    share = min(1.0, N_DEV / max(1, sum(rest_per_rel.values())))
    dev: set[str] = set()
    dev_have: Counter[str] = Counter()
    for strict in (True, False):
        for g in rest:
            if sum(dev_have.values()) >= N_DEV:
                break
            rels = [k.fact.relation for k in by_group[g]]
            if g not in dev and (
                not strict or all(dev_have[r] + 1 <= share * rest_per_rel[r] + 0.5 for r in rels)
            ):
                dev.add(g)
                dev_have.update(rels)
    bench = {g for g in rest if g not in dev}

    def members(gs: set[str]) -> set[str]:
        return {k.fact.subject for g in gs for k in by_group[g]}

    return members(reserve), members(dev), members(bench)


def neighbourhood_for(
    relation: str, target_true: str, pool: dict[str, list[dict[str, str]]], rng: random.Random
) -> list[dict[str, str]]:
    """Neighbourhood prompts: reserved facts of the same relation, one sharing ``target_true`` first."""
    same = pool.get(relation, [])
    sharing = [n for n in same if n["target"] == target_true]
    other = [n for n in same if n["target"] != target_true]
    rng.shuffle(sharing)
    rng.shuffle(other)
    picked = (sharing[:1] + other + sharing[1:])[:N_NEIGHBOURS]
    if len(picked) < N_NEIGHBOURS:  # a relation with a tiny pool borrows from the others
        extra = [n for r in sorted(pool) if r != relation for n in pool[r]]
        picked += rng.sample(extra, N_NEIGHBOURS - len(picked))
    return [dict(n) for n in picked]


def make_record(
    fact: Fact, main: str, paraphrases: Sequence[str], target_new: str, neighbourhood: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "id": "",
        "relation": fact.relation,
        "prompt": main,
        "subject": fact.subject,
        "target_new": target_new,
        "target_true": fact.target,
        "paraphrases": [fill(t, fact.subject) for t in paraphrases],
        "neighborhood": neighbourhood,
        "synthetic": fact.synthetic,
    }


def build_synthetic(
    scorer: Scorer, n: int, answers: dict[str, list[str]], taken: set[str], seed: int
) -> list[tuple[Fact, str, list[str], str]]:
    """``n`` synthetic facts ``(fact, main template, paraphrase templates, target_new)``, round-robin over
    the relations that have a synthetic subject kind; ``target_true`` is the base model's best answer."""
    rng = random.Random(seed)
    rels = [r for r in RELATIONS if r.synthetic]
    lowered = {t.lower() for t in taken}
    planned: list[tuple[Relation, str]] = []
    for i in range(n):
        rel = rels[i % len(rels)]
        name = invent_subject(rel.synthetic or "", rng)
        while name.lower() in lowered or any(
            name.lower() in t or t in name.lower() for t in lowered if len(t) > 3
        ):
            name = invent_subject(rel.synthetic or "", rng)
        lowered.add(name.lower())
        planned.append((rel, name))
    best: dict[tuple[str, str], str] = {}
    for rel in rels:
        t0, tokens0 = time.time(), scorer.tokens_run
        names = [s for r, s in planned if r is rel]
        ranked = scorer.argmax([fill(rel.templates[0], s) for s in names], answers[rel.name])
        best.update({(rel.name, s): ranked[fill(rel.templates[0], s)] for s in names})
        logger.info(
            "synthetic %-16s %4d subjects %7d tokens %6.1f s",
            rel.name,
            len(names),
            scorer.tokens_run - tokens0,
            time.time() - t0,
        )
    out = []
    for rel, name in planned:
        fact = Fact(rel.name, name, best[(rel.name, name)], synthetic=True)
        new = pick_new_target(scorer, fact, answers[rel.name], seed)
        out.append((fact, rel.templates[0], list(rel.templates[1 : 1 + N_PARAPHRASES]), new))
    return out


def check_records(scorer: Scorer, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Base-model sanity stats: how often P(target_true) > P(target_new) on prompts and paraphrases."""
    pairs: list[tuple[str, str]] = []
    for r in records:
        for p in [fill(r["prompt"], r["subject"]), *r["paraphrases"]]:
            pairs += [(p, r["target_true"]), (p, r["target_new"])]
    lp = scorer.seq_logprobs(pairs)
    main_ok = para_ok = para_n = rec_all = 0
    for r in records:
        main = fill(r["prompt"], r["subject"])
        main_ok += lp[(main, r["target_true"])] > lp[(main, r["target_new"])]
        oks = [lp[(p, r["target_true"])] > lp[(p, r["target_new"])] for p in r["paraphrases"]]
        para_ok += sum(oks)
        para_n += len(oks)
        rec_all += all(oks)
    n = max(1, len(records))
    return {
        "records": len(records),
        "real": sum(not r["synthetic"] for r in records),
        "synthetic": sum(r["synthetic"] for r in records),
        "prompt_true_gt_new": round(main_ok / n, 4),
        "paraphrase_true_gt_new": round(para_ok / max(1, para_n), 4),
        "records_all_paraphrases_true_gt_new": round(rec_all / n, 4),
    }


def greedy_share(scorer: Scorer, items: Sequence[dict[str, str]]) -> float:
    """Share of (prompt, target) items whose target's first token is the base model's greedy next token."""
    scorer.run({it["prompt"]: ((), ()) for it in items})
    ok = sum(scorer.greedy(it["prompt"]) == scorer.first_id(it["target"]) for it in items)
    return round(ok / max(1, len(items)), 4)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


DEV_PATH = ROOT / "data" / "counterfact_dev.jsonl"
BENCH_PATH = ROOT / "data" / "counterfact_bench.jsonl"
UNRELATED_PATH = ROOT / "nmke_patch" / "_data" / "unrelated_facts.jsonl"
EXAMPLES_PATH = ROOT / "examples" / "facts.json"


def check_disjoint(
    dev: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]], unrelated: Sequence[dict[str, str]]
) -> None:
    """Structural guarantees; raises AssertionError on a violation."""
    edited = {r["subject"] for r in [*dev, *bench]}
    assert not ({r["subject"] for r in dev} & {r["subject"] for r in bench}), "dev and bench share a subject"
    for r in [*dev, *bench]:
        assert r["prompt"].count("{}") == 1 and not r["prompt"].endswith("{}"), r["id"]
        assert r["target_new"] != r["target_true"], r["id"]
        assert len(r["paraphrases"]) >= 2 and len(r["neighborhood"]) >= 2, r["id"]
        assert all(r["subject"] in p for p in r["paraphrases"]), r["id"]
    # No neighbourhood or unrelated prompt mentions an edited subject.
    held = {n["prompt"] for r in [*dev, *bench] for n in r["neighborhood"]} | {u["prompt"] for u in unrelated}
    for p in held:
        words = p.replace(",", " ").replace("'s ", " ").rstrip(".")
        bad = [s for s in edited if _contains_words(words, s)]
        assert not bad, f"held-out prompt {p!r} mentions edited subject(s) {bad}"


def build(seed: int, scorer: Scorer) -> dict[str, Any]:
    """Build every output file; returns the stats that go into data/README.md."""
    t_start, cpu_start = time.time(), time.process_time()
    facts, answers = load_real_facts()
    new = {f: pick_new_target(scorer, f, answers[f.relation], seed) for f in facts}
    views = view_facts(scorer, facts, answers, new)
    known: list[Known] = []
    for f in facts:
        main = next((t for t, v in views[f].items() if v.knows), None)
        if main is not None and len(views[f]) > N_PARAPHRASES:
            known.append(Known(f, new[f], main, views[f]))
    logger.info("known real facts: %d of %d", len(known), len(facts))

    reserve, dev_subjects, _bench_subjects = partition_subjects(known, random.Random(seed + 1))
    reserved = [k for k in known if k.fact.subject in reserve]
    pool: dict[str, list[dict[str, str]]] = defaultdict(list)
    for k in reserved:
        pool[k.fact.relation].append({"prompt": fill(k.main, k.fact.subject), "target": k.fact.target})
    # Unrelated facts (shipped in the package): one per reserved subject, preferably a known phrasing other
    # than its neighbourhood (main) prompt, spread over the relations.
    unrelated_rng = random.Random(seed + 2)
    unrelated: list[dict[str, str]] = []
    for k in sorted(reserved, key=lambda k: (k.fact.subject, k.fact.relation)):
        if k.fact.subject in {u["subject"] for u in unrelated}:
            continue
        others = [t for t, v in k.views.items() if v.knows and t != k.main]
        t = unrelated_rng.choice(others) if others else k.main
        unrelated.append(
            {"prompt": fill(t, k.fact.subject), "target": k.fact.target, "subject": k.fact.subject}
        )
    unrelated_rng.shuffle(unrelated)
    unrelated = [{"prompt": u["prompt"], "target": u["target"]} for u in unrelated[:N_UNRELATED]]

    rng = random.Random(seed + 3)
    dev: list[dict[str, Any]] = []
    bench: list[dict[str, Any]] = []
    for k in known:
        if k.fact.subject not in reserve:
            record = make_record(
                k.fact,
                k.main,
                k.paraphrases(),
                k.target_new,
                neighbourhood_for(k.fact.relation, k.fact.target, pool, rng),
            )
            (dev if k.fact.subject in dev_subjects else bench).append(record)

    taken = {f.subject for f in facts} | {a for v in answers.values() for a in v}
    n_synth_dev = max(0, N_DEV - len(dev))
    n_synth = n_synth_dev + max(0, N_BENCH - len(bench))
    for i, (fact, main, paras, target_new) in enumerate(
        build_synthetic(scorer, n_synth, answers, taken, seed + 4)
    ):
        record = make_record(
            fact, main, paras, target_new, neighbourhood_for(fact.relation, fact.target, pool, rng)
        )
        (dev if i < n_synth_dev else bench).append(record)

    for prefix, rows, shuffle_seed in (("dev", dev, seed + 5), ("bench", bench, seed + 6)):
        random.Random(shuffle_seed).shuffle(rows)
        rows.sort(key=lambda r: r["synthetic"])  # real records first (stable sort keeps the shuffle)
        for i, r in enumerate(rows):
            r["id"] = f"{prefix}-{i + 1:04d}"

    # README demo: a capital, a language and a currency from the dev set that the model knows under the
    # relation's first template and every paraphrase; the counterfactual is the base model's favourite
    # wrong answer (e.g. another capital), which makes for a readable demo.
    demo: list[dict[str, Any]] = []
    for rel in ("capital", "language", "currency"):
        used = {d["subject"] for d in demo}
        cands = [k for k in known if k.fact.relation == rel and k.fact.subject in dev_subjects - used]
        cands.sort(
            key=lambda k: (
                k.main != RELATION_BY_NAME[rel].templates[0],
                -sum(k.views[t].top for t in k.paraphrases()),
                k.fact.subject,
            )
        )
        k = cands[0]
        first = scorer.first_id(k.fact.target)
        rivals = [a for a in answers[rel] if a != k.fact.target and scorer.first_id(a) != first]
        prompt = fill(k.main, k.fact.subject)
        new_target = scorer.argmax([prompt], rivals)[prompt]
        rec = next(r for r in dev if r["subject"] == k.fact.subject and r["relation"] == rel)
        demo.append({**rec, "id": f"demo-{rel}", "target_new": new_target})

    check_disjoint(dev, bench, unrelated)
    neighbour_prompts = {n["prompt"] for r in dev + bench for n in r["neighborhood"]}
    reserved_prompts = {fill(t, k.fact.subject) for k in reserved for t in k.views}
    assert neighbour_prompts <= reserved_prompts and {u["prompt"] for u in unrelated} <= reserved_prompts

    write_jsonl(DEV_PATH, dev)
    write_jsonl(BENCH_PATH, bench)
    write_jsonl(UNRELATED_PATH, unrelated)
    EXAMPLES_PATH.parent.mkdir(exist_ok=True)
    EXAMPLES_PATH.write_text(json.dumps(demo, indent=2, ensure_ascii=False) + "\n")

    per_rel = {
        "facts": Counter(f.relation for f in facts),
        "known": Counter(k.fact.relation for k in known),
        "reserved": Counter(k.fact.relation for k in reserved),
        "dev_real": Counter(r["relation"] for r in dev if not r["synthetic"]),
        "bench_real": Counter(r["relation"] for r in bench if not r["synthetic"]),
        "synthetic": Counter(r["relation"] for r in dev + bench if r["synthetic"]),
    }
    template_use = Counter((k.fact.relation, k.main) for k in known)
    template_known = Counter((f.relation, t) for f, vs in views.items() for t, v in vs.items() if v.knows)
    template_top = Counter((f.relation, t) for f, vs in views.items() for t, v in vs.items() if v.top)
    return {
        "seed": seed,
        "relations": [
            {
                "relation": rel.name,
                "candidates": len(answers[rel.name]),
                **{key: c[rel.name] for key, c in per_rel.items()},
                "templates": [
                    {
                        "template": t,
                        "top": template_top[(rel.name, t)],
                        "known": template_known[(rel.name, t)],
                        "main": template_use[(rel.name, t)],
                    }
                    for t in rel.templates
                ],
            }
            for rel in RELATIONS
        ],
        "dev": check_records(scorer, dev),
        "bench": check_records(scorer, bench),
        "bench_real_only": check_records(scorer, [r for r in bench if not r["synthetic"]]),
        "bench_synthetic_only": check_records(scorer, [r for r in bench if r["synthetic"]]),
        "examples": check_records(scorer, demo),
        "neighbourhood_prompts": len(neighbour_prompts),
        "neighbourhood_greedy_ok": greedy_share(scorer, [n for r in dev + bench for n in r["neighborhood"]]),
        "unrelated": len(unrelated),
        "unrelated_greedy_ok": greedy_share(scorer, unrelated),
        "subjects": {
            "reserved": len(reserve),
            "dev": len({r["subject"] for r in dev}),
            "bench": len({r["subject"] for r in bench}),
        },
        "model_tokens": scorer.tokens_run,
        "seconds": round(time.time() - t_start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }


def check_files(scorer: Scorer) -> dict[str, Any]:
    """Re-check the written files from scratch (the ``--check`` mode)."""
    dev, bench = read_jsonl(DEV_PATH), read_jsonl(BENCH_PATH)
    unrelated = read_jsonl(UNRELATED_PATH)
    demo = json.loads(EXAMPLES_PATH.read_text())
    check_disjoint(dev, bench, unrelated)
    return {
        "dev": check_records(scorer, dev),
        "bench": check_records(scorer, bench),
        "examples": check_records(scorer, demo),
        "neighbourhood_greedy_ok": greedy_share(scorer, [n for r in dev + bench for n in r["neighborhood"]]),
        "unrelated_greedy_ok": greedy_share(scorer, unrelated),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--check", action="store_true", help="only re-check the existing files with the model"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    from nmke_patch.models import load_base

    model, tok, info = load_base()
    scorer = Scorer(model, tok)
    if args.check:
        t0 = time.time()
        stats = check_files(scorer)
        stats["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(stats, indent=2))
        return
    stats = build(args.seed, scorer)
    stats["model"] = info.name_or_path
    write_readme(stats)
    print(json.dumps({k: v for k, v in stats.items() if k != "relations"}, indent=2))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_readme(stats: dict[str, Any], path: Path = ROOT / "data" / "README.md") -> None:
    """Write data/README.md (and data/build_stats.json) from the build stats."""
    (ROOT / "data" / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    rels = stats["relations"]
    total = {
        key: sum(r[key] for r in rels)
        for key in ("facts", "known", "reserved", "dev_real", "bench_real", "synthetic")
    }
    rel_rows = "\n".join(
        f"| `{r['relation']}` | {r['candidates']} | {r['facts']} | {r['known']} | {r['reserved']} | {r['dev_real']} "
        f"| {r['bench_real']} | {r['synthetic']} |"
        for r in rels
    )
    template_rows = "\n".join(
        f"| `{r['relation']}` | `{t['template']}` | {t['top']} | {t['known']} | {t['main']} |"
        for r in rels
        for t in r["templates"]
    )
    sanity_rows = "\n".join(
        f"| {name} | {c['records']} | {c['real']} | {c['synthetic']} | {_pct(c['prompt_true_gt_new'])} "
        f"| {_pct(c['paraphrase_true_gt_new'])} | {_pct(c['records_all_paraphrases_true_gt_new'])} |"
        for name, c in (
            ("`counterfact_dev.jsonl`", stats["dev"]),
            ("`counterfact_bench.jsonl`", stats["bench"]),
            ("bench, real only", stats["bench_real_only"]),
            ("bench, synthetic only", stats["bench_synthetic_only"]),
            ("`examples/facts.json`", stats["examples"]),
        )
    )
    synth_rels = ", ".join(f"`{r.name}` ({r.synthetic})" for r in RELATIONS if r.synthetic)
    text = f"""# Knowledge-edit data

Everything in this folder (and `examples/facts.json`, `nmke_patch/_data/unrelated_facts.jsonl`) is
generated by one deterministic script from hand-written entity tables and the embedded default model,
{stats["model"]}, run in fp32 on CPU:

```bash
source .venv/bin/activate
python data/build_dataset.py              # --seed {stats["seed"]} (default), --threads 1 (default)
python data/build_dataset.py --check      # re-verify the written files with the model (no rebuild)
```

The last build took {stats["seconds"] / 60:.1f} min wall clock and {stats["cpu_seconds"] / 60:.1f} min of CPU time on one thread (on a
shared 2-core machine; {stats["model_tokens"]:,} model tokens, model loading excluded). It rewrites every output file
and this README; `data/build_stats.json` holds the same numbers. `--check` re-scores everything from scratch
(a few minutes) and prints the sanity numbers below.

| File | Content |
|---|---|
| `data/sources/entities.json` | hand-written entity tables (countries, US states, cities, landmarks, companies, founders, people, athletes, books, paintings, inventions, musicians) |
| `data/build_dataset.py` | relations, prompt templates, model filtering, splits, checks, this README |
| `data/counterfact_dev.jsonl` | {stats["dev"]["records"]} edit records for tuning ({stats["dev"]["real"]} real, {stats["dev"]["synthetic"]} synthetic) |
| `data/counterfact_bench.jsonl` | {stats["bench"]["records"]} edit records for reported figures ({stats["bench"]["real"]} real, {stats["bench"]["synthetic"]} synthetic) |
| `nmke_patch/_data/unrelated_facts.jsonl` | {stats["unrelated"]} never-edited facts the base model answers, for retention checks |
| `examples/facts.json` | 3 demo records (a capital, a language, a currency) for the top-level README |
| `nmke_patch/_data/heldout.txt` | original held-out prose for perplexity drift (hand-written, not generated) |

## Record format

```json
{{"id": "dev-0001", "relation": "capital", "prompt": "The capital of {{}} is", "subject": "France",
 "target_new": "Rome", "target_true": "Paris",
 "paraphrases": ["The capital city of France is", "The name of the capital of France is"],
 "neighborhood": [{{"prompt": "The capital of Norway is", "target": "Oslo"}}, ...],
 "synthetic": false}}
```

`prompt` holds exactly one `{{}}` (the subject) and ends right before the answer; targets carry no leading
space (scorers score `" " + target`). Paraphrases are complete prompts with the subject filled in. Every
record has {N_PARAPHRASES} paraphrases and {N_NEIGHBOURS} neighbourhood prompts. Dev and bench list real records first
(`dev-0001`...), then synthetic ones.

## How facts are filtered

Each relation has an answer set (all true answers of that relation in the tables: every capital, every
currency, ...) used as the candidate list, and five prompt templates. For a prompt, the *sequence
log-prob* of an answer is the sum of the log-probs of the tokens of `" " + answer` after the prompt
(prompt tokenized as `tok(prompt)`, answer as `tok(" " + answer, add_special_tokens=False)`, ids concatenated;
the SmolLM2 tokenizer adds no BOS).

* A real fact is **known under a template** when the true answer has the highest sequence log-prob among
  *all* the relation's candidates (exact: a candidate's sequence log-prob is bounded by its first token's,
  so only candidates whose first token beats the true answer are scored in full) **and** the greedy next
  token is the first token of `" " + target_true`.
* A real fact is kept when it is known under at least one template. The first such template (in the
  relation's order) is the record's `prompt`; paraphrases are the other templates, those under which the
  true answer also ranks first coming first. Templates that start with the subject are not used for
  lower-case subjects ("the Netherlands").
* `target_new` is a different answer of the same relation whose first token differs from the true one
  (seeded per fact), so `P(target_true) > P(target_new)` on the main prompt by construction.
* Synthetic records use invented subjects (e.g. countries like "Velmorra", people like "Tarsk Kerrin") for
  {synth_rels}, in the relation's first template; `target_true` is the base model's best answer among the
  relation's candidates on that prompt, the paraphrases are the next two templates, `"synthetic": true`.
  Invented names never equal or contain (or are contained in) a real subject or answer.

## Splits and disjointness

Subjects (not facts) are partitioned, after grouping subjects whose words contain one another ("Sudan" /
"South Sudan", "Jordan" / "Michael Jordan") so that a group always lands in one part:

1. **reserve** ({stats["subjects"]["reserved"]} subjects): about {int(RESERVE_SHARE * 100)}% of every relation's known facts (at least
   {MIN_RESERVE} per relation). Never edited. Their main prompts are the neighbourhood pool
   ({stats["neighbourhood_prompts"]} distinct prompts used); the unrelated-fact set takes one fact per reserved subject, in
   another phrasing the model also knows where there is one.
2. **dev** ({stats["subjects"]["dev"]} subjects): {N_DEV} real records, the same share of every relation's remaining known facts.
3. **bench** ({stats["subjects"]["bench"]} subjects): every other known real fact, then synthetic records up to {N_BENCH}.

Checked by the script (it fails otherwise): no subject is in both dev and bench; no neighbourhood or
unrelated prompt is about, or mentions, any edited subject (dev or bench); every neighbourhood prompt and
unrelated fact is a reserved fact the base model knows. Neighbourhood prompts come from the record's own
relation, one of them sharing `target_true` where the pool has one (as in CounterFact, so that
over-generalising the edit shows up); a relation whose pool is too small borrows from the others.

## Counts per relation

Candidates = size of the answer set; facts = facts in the tables; known = kept by the filter; reserved =
held back (never edited); synthetic = synthetic records (dev + bench).

| Relation | Candidates | Facts | Known | Reserved | Dev (real) | Bench (real) | Synthetic |
|---|---:|---:|---:|---:|---:|---:|---:|
{rel_rows}
| **total** | | {total["facts"]} | {total["known"]} | {total["reserved"]} | {total["dev_real"]} | {total["bench_real"]} | {total["synthetic"]} |

## Base-model sanity check

Share where the base model prefers `target_true` over `target_new` (sequence log-prob), before any edit:

| Set | Records | Real | Synthetic | Main prompt | Paraphrases | Records with all paraphrases |
|---|---:|---:|---:|---:|---:|---:|
{sanity_rows}

Neighbourhood prompts whose target is the base model's greedy next token: {_pct(stats["neighbourhood_greedy_ok"])};
unrelated facts: {_pct(stats["unrelated_greedy_ok"])} (both also rank their target first among the relation's candidates).
Paraphrases are not all "known" (the model is small and phrasing-sensitive), which is why they are reported
here rather than required.

## Caveats

* The model is small: {total["known"]} of {total["facts"]} table facts pass the filter, unevenly (currencies and
  founders/painters/inventors are rarely known; city -> country and languages often are). Relations with
  fewer than {MIN_RESERVE * 2} known facts contribute mostly to the reserve.
* A synthetic record's `target_true` is only the base model's favourite among the candidates for an
  invented subject, often by a small margin and often a generic answer ("Europe", "football"); treat
  synthetic results as "can the edit install a new association", real ones as "can it overwrite a known fact".
* Paraphrases and synthetic prompts are not filtered for greedy agreement, so some paraphrases already
  prefer `target_new` before editing (table above); subtract that baseline when reporting generalisation.
* Answers follow common English usage and the tables' single-answer choice (e.g. "England" for cities in
  England, "peso"/"dollar" without the country adjective); facts without one uncontroversial answer were
  left out of the tables.

## Templates

Per template: how many facts have the true answer ranked first (top), how many are known (top + greedy
match), and how many records use it as the main prompt.

| Relation | Template | Top | Known | Main |
|---|---|---:|---:|---:|
{template_rows}
"""
    path.write_text(text)


if __name__ == "__main__":
    main()
