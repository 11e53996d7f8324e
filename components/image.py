"""The container images of the platform, and the one tag scheme shared by `make images`, the compiled pipeline
and the kustomize overlays.

- :data:`IMAGE_EXTRAS`: every image `make images` builds and the medseg-ops extras it installs
  (components/<image>/Dockerfile; ``base`` is the shared layer without dependencies).
- Tags: `make images` tags each image ``<version>`` and ``<version>-<git sha>``; the overlays pin ``<version>``
  (k8s/overlays/*/kustomization.yaml ``images:``), and so does the compiled pipeline unless
  ``MEDSEG_IMAGE_TAG`` says otherwise (`make compile` passes ``IMAGE_TAG``, e.g. the sha tag of one build).
  ``MEDSEG_IMAGE_REGISTRY`` (default ``ghcr.io/medseg-ops``) is the registry prefix. Both are read when
  the pipeline module is imported, i.e. when it is compiled.
"""

import os

from medseg import __version__

DEFAULT_REGISTRY = "ghcr.io/medseg-ops"
REGISTRY = os.environ.get("MEDSEG_IMAGE_REGISTRY", DEFAULT_REGISTRY)
TAG = os.environ.get("MEDSEG_IMAGE_TAG") or __version__

IMAGE_EXTRAS: dict[str, tuple[str, ...]] = {
    "base": (),
    "ingest": ("data", "pipelines"),
    "preprocess": ("train", "pipelines"),
    "train": ("train", "pipelines"),      # tune runs here too
    "evaluate": ("train", "pipelines"),
    "register": ("train", "pipelines"),
    "promote": ("train", "pipelines"),
    "serve": ("serve",),                  # the InferenceService's predictor: no kfp
    "predict": ("serve-torch", "pipelines"),  # batch inference (on GPUs too: torch) and the pipeline's serve step (KFP's executor needs kfp)
    "deploy": ("pipelines",),
    "tracking": ("tracking",),            # the MLflow server of k8s/
}


def image(stage: str) -> str:
    """``<registry>/medseg-<stage>:<tag>`` of one of :data:`IMAGE_EXTRAS`."""
    if stage not in IMAGE_EXTRAS:
        raise ValueError(f"no image {stage!r}: one of {', '.join(IMAGE_EXTRAS)}")
    return f"{REGISTRY}/medseg-{stage}:{TAG}"


# kfp.local runs components in this same environment, where medseg is installed already: never let a
# component pip-install kfp or anything else from an index at run time.
COMPONENT_OPTIONS = {"install_kfp_package": False}
