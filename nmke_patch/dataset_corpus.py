"""A ``datasets`` data set as preserved text for the key statistics: ``--stats-corpus dataset:NAME?...``.

``NAME`` is what :func:`datasets.load_dataset` takes: a Hub id (``wikitext``, ``Salesforce/wikitext``, when
online) or a local folder of data files (``.jsonl``, ``.parquet``, ``.csv``, ``.txt``). Optional query
parameters: ``config``, ``split`` (default ``train``), ``field`` (default ``text``, else the first string
column) and ``revision``, ``&``-separated, percent-escaped where needed (``%3F`` for a ``?`` in a name,
``+`` is kept as is). Rows are streamed, so only what ``stats_tokens`` needs is read, e.g.
``dataset:wikitext?config=wikitext-103-raw-v1&split=train``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .errors import ModelLoadError

PREFIX = "dataset:"
_PARAMS = ("config", "split", "field", "revision")


def is_dataset(corpus: str) -> bool:
    """Whether a ``stats_corpus`` value names a data set rather than text files."""
    return corpus.startswith(PREFIX)


@dataclass(frozen=True)
class DatasetCorpus:
    """A parsed ``dataset:NAME?config=...&split=...&field=...&revision=...`` value."""

    name: str
    config: str | None = None
    split: str = "train"
    field: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, corpus: str) -> DatasetCorpus:
        """Parse and check a value (the ``datasets`` package included) before any model is loaded.

        Raises:
            ModelLoadError: an empty name, an unknown or repeated parameter, or ``datasets`` not installed.
        """
        raw_name, _, query = corpus.removeprefix(PREFIX).partition("?")
        name = unquote(raw_name).strip()
        if not name:
            raise ModelLoadError(f"stats corpus {corpus!r}: no data set name after {PREFIX!r}")
        params: dict[str, str] = {}
        for part in query.split("&") if query else []:
            key, eq, value = part.partition("=")
            key, value = unquote(key).strip(), unquote(value).strip()
            if key not in _PARAMS or key in params or not eq or not value:
                raise ModelLoadError(
                    f"stats corpus {corpus!r}: {part!r} is not one of {', '.join(_PARAMS)}=VALUE, once each"
                )
            params[key] = value
        try:
            import datasets  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                f"stats corpus {corpus!r} needs the 'datasets' package: pip install 'nmke-patch[datasets]'"
            ) from exc
        return cls(name, **params)

    @property
    def key(self) -> str:
        """Cache key part: the value's identity and, for a local folder or file, its absolute path and the
        content of its files (so another folder of the same name, or edited files, are not mistaken for it).
        A Hub data set is known by name only: pin ``revision`` if it may change."""
        digest = hashlib.sha256()
        for value in (self.name, self.config, self.split, self.field, self.revision):
            digest.update(f"{value}|".encode())
        local = Path(self.name)
        if local.exists():
            files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
            digest.update(str(local.resolve()).encode())
            for file in files:
                digest.update(f"|{file.relative_to(local) if local.is_dir() else file.name}|".encode())
                digest.update(file.read_bytes())
        return digest.hexdigest()[:16]

    def texts(self) -> Iterator[str]:
        """The data set's texts in order, streamed.

        Raises:
            ModelLoadError: the data set cannot be loaded (offline, unknown name, no such split) or has no
                string column ``field``.
        """
        import datasets

        try:
            rows: Any = datasets.load_dataset(
                self.name, self.config, split=self.split, revision=self.revision, streaming=True
            )
            for row in rows:
                field = self.field or ("text" if "text" in row else _first_text_column(row))
                value = row.get(field)
                if not isinstance(value, str):
                    raise ModelLoadError(
                        f"stats corpus data set {self.name!r}: no text in field {field!r} (columns: {sorted(row)})"
                    )
                yield value
        except ModelLoadError:
            raise
        except Exception as exc:  # datasets raises many types: offline, not found, bad config or split
            raise ModelLoadError(f"cannot read stats corpus data set {self.name!r}: {exc}") from exc


def _first_text_column(row: dict[str, Any]) -> str:
    return next((k for k, v in row.items() if isinstance(v, str)), "text")
