"""``pack``, ``push`` and ``pull``: build edit packs and share them on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nmke_patch.hub import pull_pack, push_pack
from nmke_patch.pack import build_pack, read_pack_json
from nmke_patch.sources import resolve_patches

from .common import console, err_console, labelled

TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", help="Hugging Face token (default: HF_TOKEN or the token saved by `hf auth login`)."
    ),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit on the Hub.")]


def push(
    sources: Annotated[
        list[str],
        typer.Argument(metavar="PATCH_OR_PACK", help="Patch directories or edit packs, in order."),
    ],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="Hub repository, e.g. user/capitals-pack.")
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Branch to push to (created from main if missing; not a commit id)."),
    ] = None,
    token: TokenOpt = None,
    with_peft: Annotated[
        bool, typer.Option("--with-peft", help="Also upload the pack as a LoRA adapter under peft/.")
    ] = False,
) -> None:
    """Upload patches as an edit pack (patches, pack.json, model card) to a Hub model repository."""
    patches = resolve_patches(sources)  # read once: a pack counts its patches
    url = push_pack(patches, repo_id, private=private, revision=revision, token=token, with_peft=with_peft)
    if url.changed:
        message = f"pushed {len(patches)} patch(es) to {repo_id}: {url}"
    else:
        message = f"{repo_id} already holds this pack of {len(patches)} patch(es), nothing pushed: {url}"
    console.print(message, highlight=False, soft_wrap=True)


def pack(
    sources: Annotated[
        list[str],
        typer.Argument(metavar="PATCH_OR_PACK", help="Patch directories or edit packs, in order."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to build the pack in (new or empty).")],
    repo_id: Annotated[
        str | None,
        typer.Option("--repo-id", help="Hub repository the pack is meant for (named in its model card)."),
    ] = None,
    with_peft: Annotated[
        bool, typer.Option("--with-peft", help="Also add the pack as a LoRA adapter under peft/.")
    ] = False,
) -> None:
    """Build an edit pack in a local folder (offline): what `push` would upload.

    Review, copy or upload it yourself; `inspect FOLDER` and every patch command read it as they read a
    pulled pack."""
    patches = resolve_patches(sources)  # every patch verified before anything is written
    folder = build_pack(patches, out, repo_id=repo_id, with_peft=with_peft)
    _print_entries(folder)
    console.print(f"pack of {len(patches)} patch(es) built in {folder}", highlight=False, soft_wrap=True)


def _print_entries(folder: Path, out: Console = console) -> None:
    """One "ok" line per patch of a (verified) pack folder."""
    for entry in read_pack_json(folder):
        out.print(labelled("ok", "green", f"{entry['name']} ({entry['id'][:12]})"), highlight=False)


def pull(
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="user/pack, hf://user/pack or hf://user/pack@rev.")
    ],
    revision: RevisionOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Also copy the verified pack into this folder (new, empty, or an earlier pull's, which is "
                "replaced whole); downloads still go through the Hugging Face cache."
            ),
        ),
    ] = None,
    token: TokenOpt = None,
) -> None:
    """Download an edit pack and verify every patch in it (paths, schema, sha256)."""
    folder = pull_pack(repo_id, revision=revision, local_dir=out, token=token)
    # already verified; stdout is the folder alone: dir=$(nmke-patch pull ...)
    _print_entries(folder, err_console)
    typer.echo(str(folder))


def register(app: typer.Typer) -> None:
    app.command("pack")(pack)
    app.command("push")(push)
    app.command("pull")(pull)
