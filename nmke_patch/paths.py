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


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_permissions(files: list[Path]) -> None:
    """Give ``files`` the permissions a plainly created file gets under the umask: writers that make 0600
    files (safetensors' ``save_file``, which ``save_pretrained`` uses) would leave a saved model unreadable
    to the other users of a shared machine."""
    mode = 0o666 & ~current_umask()
    for file in files:
        os.chmod(file, mode)
