"""Where nmke-patch keeps its caches: ``$NMKE_PATCH_HOME`` or ``~/.cache/nmke-patch``."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of nmke-patch's cache (converted default model, key statistics, checkpoints)."""
    env = os.environ.get("NMKE_PATCH_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "nmke-patch"
    root.mkdir(parents=True, exist_ok=True)
    return root
