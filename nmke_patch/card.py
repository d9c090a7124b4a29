"""The human-readable ``README.md`` written into every patch directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .patch import Patch


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
        "| # | prompt | new target | P(new) before | P(new) after |",
        "|---|---|---|---|---|",
    ]
    metrics = {int(x.get("index", i)): x for i, x in enumerate(m.metrics)}
    for i, r in enumerate(m.requests):
        prompt = str(r.get("prompt", "")).replace("{}", str(r.get("subject", ""))).replace("|", "\\|")
        mx = metrics.get(i, {})
        before, after = mx.get("p_new_before"), mx.get("p_new_after")
        fmt = lambda v: "" if v is None else f"{float(v):.3f}"  # noqa: E731
        lines.append(f"| {i} | {prompt} | {r.get('target_new', '')} | {fmt(before)} | {fmt(after)} |")
    return "\n".join(lines) + "\n"
