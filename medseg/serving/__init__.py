"""Serving: a KServe model server for model packages of every task, and its client.

- :mod:`medseg.serving.model`: ``MedsegModel`` (a ``kserve.Model``: load / preprocess / predict / postprocess;
  ``SegmentationModel`` is the same class) answering Open Inference Protocol v2 and KServe V1 requests for
  segmentation, 2D slice-set and classification packages, and ``GET /v2/models/NAME`` with their real inputs
  and outputs.
- :mod:`medseg.serving.contract`: what one loaded version's endpoint takes and answers, from its task.
- :mod:`medseg.serving.decode`: request → case (BYTES NIfTI per channel, one FP32 ``[C,Z,Y,X]`` volume, or one
  2D picture; covariates such as ``age``), every client mistake a message naming the input.
- :mod:`medseg.serving.image2d`: a PNG/TIFF slice as a case of a 2D model, and its mask in the same format.
- :mod:`medseg.serving.guard`: the ASGI guard in front of KServe's app (size limit, admission by count and parse
  memory with 503, timeout with 504, binary tensor extension, version routes, repository routes refused, JSON
  errors); :mod:`medseg.serving.limits` its numbers, tickets and the cgroup memory budget.
- :mod:`medseg.serving.grpc_server`: KServe's gRPC V2 service on the same host, gate and limits (``--grpc-port``).
- :mod:`medseg.serving.reload`: versions loaded beside each other and swapped atomically, alias polling, the
  model repository (its load() reloads in process; the server refuses the repository routes).
- :mod:`medseg.serving.drift`: input drift z-scores against the package's training statistics.
- :mod:`medseg.serving.server`: ``serve()`` (the real KServe ``ModelServer``, REST and optionally gRPC, bound to
  one host, 127.0.0.1 by default) and helpers to run it as a subprocess (tests, local runs).
- :mod:`medseg.serving.client`: ``model_info()``, ``infer()``, ``infer_image()``, ``infer_volume()`` and ``medseg predict``.
- :mod:`medseg.serving.smoke`: serve-and-check one held-out case in the form its task takes (the pipeline's serve step).
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
            from medseg.optional import needs_extra

            with needs_extra("serve", "the model server"):
                import kserve
        finally:
            sys.argv = saved
    return kserve
