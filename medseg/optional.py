"""Optional dependencies: each stage's libraries come with an extra of ``medseg-ops``.

The core install (numpy, nibabel, scipy, PyYAML, Pillow, tqdm, httpx) covers what every stage imports;
``serve``, ``train``, ``data``, ``pipelines`` and ``tracking`` add the rest (see pyproject.toml), ``all``
is everything. A library a stage needs but the install lacks must say which extra brings it, not end in a
bare ``ModuleNotFoundError`` deep in a traceback::

    with needs_extra("serve", "the model server"):
        import kserve

    optuna = require("optuna", "train", "medseg tune")
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from medseg.errors import MedsegError

EXTRAS = ("serve", "serve-torch", "train", "data", "pipelines", "tracking", "all")


class MissingExtraError(MedsegError, ImportError):
    """A library of an extra that is not installed. Also an ``ImportError``, so code that already treats
    a missing optional library as absent (``except ImportError``) keeps doing so."""

    def __init__(self, what: str, extra: str, module: str | None):
        self.extra = extra
        self.module = module
        missing = f" (missing module: {module})" if module else ""
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'medseg-ops[{extra}]'{missing}")


def is_third_party(exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` is about a library outside medseg (a missing extra), not a broken medseg module."""
    name = exc.name or ""
    return bool(name) and name.split(".")[0] != "medseg"


@contextmanager
def needs_extra(extra: str, what: str) -> Iterator[None]:
    """Turn a ``ModuleNotFoundError`` of a third-party library raised in the block into a
    :class:`MissingExtraError` naming ``extra`` (``what``: the stage or feature, e.g. ``"medseg serve"``)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r} (one of {', '.join(EXTRAS)})")
    try:
        yield
    except ModuleNotFoundError as exc:
        if not is_third_party(exc):
            raise
        raise MissingExtraError(what, extra, exc.name) from exc


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` naming ``extra`` when it (or a library it imports) is absent."""
    with needs_extra(extra, what):
        return importlib.import_module(module)
