"""Prometheus metrics of the model server (default registry, so KServe's ``/metrics`` shows them).

Besides these, KServe itself exports ``request_preprocess_seconds``, ``request_predict_seconds`` and
``request_postprocess_seconds`` histograms by ``model_name``.

Names used by alert rules elsewhere (keep them): ``medseg_input_drift_zscore``,
``medseg_input_drift_last_zscore``, ``medseg_requests_total``, ``medseg_model_info``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REQUESTS = Counter(
    "medseg_requests",  # exported as medseg_requests_total
    "Inference requests by outcome (2xx answered, 4xx client mistake, 5xx server error, overload or timeout).",
    ["model", "status"],
)
REJECTED = Counter(
    "medseg_rejected_requests",  # exported as medseg_rejected_requests_total
    "Inference requests refused before or instead of inference, by reason: too_large (413), bad_content_type (415), "
    "not_an_object (400, a V2 body that is not a JSON object), bad_binary (400, malformed binary extension), overloaded (503, queue full), timeout (504).",
    ["model", "reason"],
)
INFERENCE_SECONDS = Histogram(
    "medseg_inference_seconds",
    "Time spent in the predictor (preprocessing, sliding window, restoring the geometry), per request, in seconds.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
STAGE_SECONDS = Histogram(
    "medseg_stage_seconds",
    "Seconds per request and stage: preprocess (decode + checks + drift), queue (waiting for an inference slot), "
    "predict (the predictor), postprocess (encoding the answer).",
    ["model", "stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
INPUT_VOXELS = Histogram(
    "medseg_input_voxels",
    "Voxels per channel of the input volumes (I*J*K).",
    ["model"],
    buckets=(1e4, 1e5, 5e5, 1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7, 6.4e7),
)
DRIFT_ZSCORE = Histogram(
    "medseg_input_drift_zscore",
    "Per request and channel: |mean of the nonzero voxels - training mean| / training std (see the README for the "
    "training statistic used). Observed only when the model package carries training statistics.",
    ["model", "channel"],
    buckets=(0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 20, 50),
)
DRIFT_LAST_ZSCORE = Gauge(
    "medseg_input_drift_last_zscore",
    "The drift z-score of the last request, per channel (same definition as medseg_input_drift_zscore).",
    ["model", "channel"],
)
MODEL_INFO = Info(
    "medseg_model",  # exported as medseg_model_info
    "The model served: registered version ('local' for a package folder), configuration, and the training "
    "statistic the drift z-score compares with (case_mean_nonzero, voxel_foreground or none).",
    ["model"],
)
MODEL_RELOADS = Counter(
    "medseg_model_reloads",  # exported as medseg_model_reloads_total
    "Model version changes while serving (alias moved, or the repository's load() in process), by outcome.",
    ["model", "outcome"],
)
INFLIGHT = Gauge("medseg_inflight_requests", "Inference requests being processed by the model.", ["model"])
ADMITTED = Gauge("medseg_admitted_requests", "Inference requests admitted by the server (running + queued; capped by --max-concurrent + --max-queue).")
ADMITTED_BYTES = Gauge("medseg_admitted_parse_bytes", "Parse memory reserved by the admitted requests: body bytes × growth of their encoding "
                                                      "(capped by --memory-budget-mb).")

__all__ = ["ADMITTED", "ADMITTED_BYTES", "DRIFT_LAST_ZSCORE", "DRIFT_ZSCORE", "INFERENCE_SECONDS", "INFLIGHT", "INPUT_VOXELS", "MODEL_INFO",
           "MODEL_RELOADS", "REJECTED", "REQUESTS", "STAGE_SECONDS"]
