"""The ``nmke-patch`` command line. Every command lives in a module of this package that registers itself
here; this module is the one place that turns errors into messages and exit codes."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn, cast

import typer

from nmke_patch.errors import NmkePatchError

from .common import ShownFormatter, err_console, labelled

app = typer.Typer(
    name="nmke-patch",
    help="Compute knowledge edits as sparse, neuron-masked patches; inspect, apply, stack, revert and share them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from nmke_patch.patch import FORMAT_NAME, FORMAT_VERSION
    from nmke_patch.version import __version__

    parts = [f"nmke-patch {__version__} (patch format {FORMAT_NAME}/{FORMAT_VERSION})"]
    for package in ("torch", "transformers", "safetensors", "peft", "huggingface_hub"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} not installed")
    typer.echo("; ".join(parts))
    raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the versions of nmke-patch, its patch format and the libraries it runs on, and exit.",
    ),
) -> None:
    stderr = logging.StreamHandler()  # library warnings name strangers' patches and files too: shown()
    stderr.setFormatter(ShownFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[stderr])
    import huggingface_hub.utils.logging  # noqa: F401  (sets up its logger, with a handler of its own)

    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):  # its records reach the handler above: printed once, not twice
        hub.removeHandler(handler)
    # its retry notices ("Retrying in 1s [Retry 1/5]") are summed up by our one error line; -v shows them
    hub.setLevel(logging.INFO if verbose else logging.ERROR)


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


def _is_usage_error(exc: BaseException) -> bool:
    """A click usage error (typer may bundle its own copy of click, so match the interface, not a class)."""
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _fail(message: str, code: int) -> NoReturn:
    err_console.print(labelled("error:", "bold red", message), soft_wrap=True)
    sys.exit(code)


def run() -> None:
    """Console-script entry point: one clear line and a non-zero exit on any expected error
    (2 for a usage error, 130 when interrupted)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        # Not standalone, so our errors reach the handlers below; typer then returns the exit code of a
        # typer.Exit (Ctrl-C becomes Exit(130)) instead of exiting.
        code = app(standalone_mode=False)
    except NmkePatchError as exc:
        _fail(str(exc), exc.exit_code)
    except OSError as exc:  # a missing file, a full disk, a busy mount point: the message says which
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        code = 130
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        cast(Any, exc).show()
        sys.exit(cast(Any, exc).exit_code)
    if code == 130:
        err_console.print("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    run()
