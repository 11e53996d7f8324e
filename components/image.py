"""The container image every component runs in on a cluster: one registry prefix and tag, configurable.

``MEDSEG_IMAGE_REGISTRY`` (default ``ghcr.io/medseg-ops``) and ``MEDSEG_IMAGE_TAG`` (default
``<package version>-<git sha>``, the tag ``make images`` builds) are read when the pipeline module is
imported, i.e. when it is compiled.
"""

import os

from medseg.pipeline.runner import compiled_version

REGISTRY = os.environ.get("MEDSEG_IMAGE_REGISTRY", "ghcr.io/medseg-ops")
TAG = os.environ.get("MEDSEG_IMAGE_TAG") or compiled_version()


def image(stage: str) -> str:
    return f"{REGISTRY}/medseg-{stage}:{TAG}"


# kfp.local runs components in this same environment, where medseg is installed already: never let a
# component pip-install kfp or anything else from an index at run time.
COMPONENT_OPTIONS = {"install_kfp_package": False}
