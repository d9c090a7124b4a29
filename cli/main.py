"""The ``nmke-patch`` command line. Every command lives in a module of this package that registers itself
here; this module is the one place that turns errors into messages and exit codes."""

from __future__ import annotations

import logging
import os
import sys

import typer

from nmke_patch.errors import NmkePatchError

from .common import err_console

app = typer.Typer(
    name="nmke-patch",
    help="Compute knowledge edits as sparse, neuron-masked patches; inspect, apply, stack, revert and share them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _register() -> None:
    from . import patch_commands

    patch_commands.register(app)
    for module in ("create_commands", "eval_commands", "peft_commands", "hub_commands"):
        try:
            mod = __import__(f"{__package__}.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise
            continue
        mod.register(app)


_register()


def run() -> None:
    """Console-script entry point: one clear line and a non-zero exit on any expected error."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        app(standalone_mode=False)
    except NmkePatchError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    run()
