"""Typed errors. Each also inherits the built-in a caller would naturally catch.

The CLI turns every :class:`NmkePatchError` into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class NmkePatchError(Exception):
    """Base class of every error nmke-patch raises on purpose."""

    exit_code = 1


class InvalidPatchError(NmkePatchError, ValueError):
    """A patch directory or file is malformed, tampered with, or inconsistent."""


class DamagedFileError(InvalidPatchError):
    """A patch file's bytes are not the ones its manifest records (truncated, damaged on the way, or
    tampered with)."""


class PatchMismatchError(NmkePatchError, ValueError):
    """A patch does not fit the model it is applied to (shapes, originals, parents)."""


class PatchNotAppliedError(NmkePatchError, KeyError):
    """Unloading a patch that is not in the stack."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedArchitectureError(NmkePatchError, NotImplementedError):
    """The model's architecture is not in the architecture table."""


class ModelLoadError(NmkePatchError, OSError):
    """A base model could not be found or loaded."""


class InvalidRequestError(NmkePatchError, ValueError):
    """An edit request (a fact record) is malformed."""


class HubError(NmkePatchError, OSError):
    """Pushing to or pulling from the Hugging Face Hub failed."""


class EditError(NmkePatchError, RuntimeError):
    """Computing an edit failed numerically (an update that is not finite)."""


class ExportError(NmkePatchError, ValueError):
    """A patch cannot be exported in the requested format."""
