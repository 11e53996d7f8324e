"""medseg-ops: an MLOps platform for 3D medical image segmentation.

The package layout mirrors the pipeline stages (as nnU-Net's does):
``ingest`` → ``preprocessing`` → ``training`` (incl. tuning) → ``inference`` → ``evaluation``
→ ``registry`` → ``serving``; ``pipeline`` wires them into one Kubeflow pipeline.
The artefact schemas passed between stages live in :mod:`medseg.schemas`.
"""

__version__ = "0.1.0"
