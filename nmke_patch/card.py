"""The human-readable ``README.md`` written into every patch directory."""

from __future__ import annotations

from typing import Any

from .patch import Patch, is_finite_number


def filled_prompt(request: dict[str, Any]) -> str:
    """A manifest request's prompt with its subject written in, for display. Only the first ``{}`` is
    filled (``create`` writes exactly one): a stranger's manifest with thousands of ``{}`` and a long
    subject must not turn a few kilobytes into a card of hundreds of megabytes."""
    return str(request.get("prompt", "")).replace("{}", str(request.get("subject", "")), 1)


def _index(metric: Any, default: int) -> int:
    index = metric.get("index", default) if isinstance(metric, dict) else default
    return index if isinstance(index, int) else default


def fmt_probability(value: Any) -> str:
    """A probability with 3 decimals; empty for null or anything that is not a finite number."""
    return f"{float(value):.3f}" if is_finite_number(value) else ""


def p_new_with_patch(metric: dict[str, Any]) -> Any:
    """An edit's P(new) with the whole patch applied (``p_new_final``), or, in manifests that do not record
    it, right after the edit (``p_new_after``)."""
    return metric.get("p_new_final", metric.get("p_new_after"))


def patch_card(patch: Patch) -> str:
    """A Markdown summary of ``patch``: base model, method, footprint and the facts it edits."""
    m = patch.manifest
    base = m.base_model.get("name_or_path", "?")
    lines = [
        f"# {m.name}",
        "",
        f"An [nmke-patch](https://pypi.org/project/nmke-patch/) knowledge-editing patch for `{base}`.",
        "",
        f"- method: `{m.method.get('name', '?')}`",
        f"- created: {m.created_at} with nmke-patch {m.tool_version}",
        f"- edited tensors: {len(patch.deltas)}; neurons touched: {patch.num_neurons}; payload {patch.nbytes:,} bytes",
        f"- parents: {', '.join(p.name for p in m.parents) or 'none'}",
        "",
        "Apply with `nmke-patch apply PATCH --out DIR` or `nmke_patch.load_model(patches=[PATCH])`.",
        "",
        "## Facts",
        "",
        "| # | prompt | new target | P(new) before | P(new) with the patch |",
        "|---|---|---|---|---|",
    ]
    metrics = {_index(x, i): x for i, x in enumerate(m.metrics)}
    for i, r in enumerate(m.requests):
        prompt = filled_prompt(r).replace("|", "\\|")
        mx = metrics.get(i, {})
        before = mx.get("p_new_before")
        after = p_new_with_patch(mx)
        lines.append(
            f"| {i} | {prompt} | {r.get('target_new', '')} | {fmt_probability(before)} | {fmt_probability(after)} |"
        )
    return "\n".join(lines) + "\n"
