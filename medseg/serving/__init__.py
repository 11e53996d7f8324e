"""Serving: a KServe model server for model packages, and its client.

- :mod:`medseg.serving.model`: ``SegmentationModel`` (a ``kserve.Model``) answering Open Inference Protocol v2
  requests whose inputs are the channel NIfTI files, base64 text in one ``BYTES`` element each.
- :mod:`medseg.serving.server`: ``serve()`` (the real KServe ``ModelServer``, REST only, bound to one host,
  127.0.0.1 by default) and helpers to run it as a subprocess (tests, local runs).
- :mod:`medseg.serving.client`: ``infer()`` and ``medseg predict``.
- :mod:`medseg.serving.metrics`: the ``medseg_*`` Prometheus metrics shown on ``/metrics``.

kserve parses ``sys.argv`` when ``kserve.model_server`` is imported (and ``import kserve`` imports it), so an
unrelated command line (``medseg serve --model ...``, pytest's) could be misread or make it exit. Import kserve
only through :func:`import_kserve`.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_IMPORT_LOCK = threading.Lock()


def import_kserve() -> ModuleType:
    """``import kserve`` with ``sys.argv`` reduced to the program name while kserve reads it."""
    if "kserve.model_server" in sys.modules:
        import kserve

        return kserve
    with _IMPORT_LOCK:
        saved = sys.argv
        sys.argv = saved[:1] if saved else ["medseg"]
        try:
            import kserve
        finally:
            sys.argv = saved
    return kserve
