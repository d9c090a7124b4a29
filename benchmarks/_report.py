"""Shared by the benchmark scripts: write one section of BENCHMARKS.md, keeping the others."""

from __future__ import annotations

from pathlib import Path


def update_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the section headed ``section`` (a ``## `` line) of ``path`` with ``body``."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == section), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + block + ("\n" + rest if rest else "")
    path.write_text(text, encoding="utf-8")
