"""medseg-ops: an MLOps platform for 3D medical image segmentation.

The package layout mirrors the pipeline stages (as nnU-Net's does):
``ingest`` → ``preprocessing`` → ``training`` (incl. tuning) → ``inference`` → ``evaluation``
→ ``registry`` → ``serving``; ``pipeline`` wires them into one Kubeflow pipeline.
The artefact schemas passed between stages live in :mod:`medseg.schemas`.
"""

__version__ = "0.1.0"

import os as _os

# Nothing leaves the machine at run time: MLflow's usage telemetry is off unless the user turns it on,
# and its artefact download bars stay out of pipeline logs.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
