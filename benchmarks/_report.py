"""Shared by the benchmark scripts: write one section of BENCHMARKS.md, keeping the others."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from pathlib import Path

from nmke_patch.methods.nmke.config import EditConfig


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


def cpu_name() -> str:
    """The CPU's model name, for the machine line of a report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_settings(pairs: Iterable[str]) -> dict[str, object]:
    """``KEY=JSON`` command-line settings (``--set``) as EditConfig overrides."""
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key.strip()] = json.loads(value)
    return settings


def refuse_unread(configs: Iterable[EditConfig], names: Iterable[str]) -> None:
    """Stop, as ``nmke-patch create`` does, on a ``--set`` that none of ``configs`` reads (one run may hold
    several methods): it would do nothing, and the results would be filed under settings they did not have."""
    asked = set(names) - {"method"}
    unread, reasons = set(asked), {}
    for config in configs:
        unused = config.unused(asked)
        unread &= set(unused)
        reasons.update(unused)
    if unread:
        given = "; ".join(f"{name} ({reasons[name]})" for name in sorted(unread))
        raise SystemExit(f"--set of a setting these runs never read, so it would do nothing: {given}")
