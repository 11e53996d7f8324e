"""Prometheus metrics of the model server (default registry, so KServe's ``/metrics`` shows them).

Besides these, KServe itself exports ``request_preprocess_seconds``, ``request_predict_seconds`` and
``request_postprocess_seconds`` histograms by ``model_name``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REQUESTS = Counter(
    "medseg_requests",  # exported as medseg_requests_total
    "Inference requests by outcome (2xx answered, 4xx client mistake, 5xx server error).",
    ["model", "status"],
)
INFERENCE_SECONDS = Histogram(
    "medseg_inference_seconds",
    "Time spent in the predictor (preprocessing, sliding window, restoring the geometry), per request.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
INPUT_VOXELS = Histogram(
    "medseg_input_voxels",
    "Voxels per channel of the input volumes (I*J*K).",
    ["model"],
    buckets=(1e4, 1e5, 5e5, 1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7, 6.4e7),
)
MODEL_INFO = Info(
    "medseg_model",  # exported as medseg_model_info
    "The model served: registered version ('local' for a package folder) and configuration.",
    ["model"],
)
INFLIGHT = Gauge("medseg_inflight_requests", "Inference requests being processed.", ["model"])

__all__ = ["INFERENCE_SECONDS", "INFLIGHT", "INPUT_VOXELS", "MODEL_INFO", "REQUESTS"]
