"""Where a model package comes from: a local folder, or the MLflow registry (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``). Used by the KServe predictor and by batch prediction alike."""

from __future__ import annotations

import tempfile
from pathlib import Path

from medseg import schemas
from medseg.errors import MedsegError

MODELS_URI_PREFIX = "models:/"


def resolve_model_source(model_uri: str | Path, download_dir: str | Path | None = None) -> tuple[Path, str]:
    """``(model package folder, version)``: ``'local'`` for a folder, the registered version for ``models:/``."""
    uri = str(model_uri)
    if uri.startswith(MODELS_URI_PREFIX):
        return _download_registered(uri, download_dir)
    path = Path(uri).expanduser()
    if not path.exists():
        raise MedsegError("model not found (expected a model package folder or models:/NAME@ALIAS)", path)
    if not (path / schemas.MODEL_PACKAGE_JSON).is_file():
        raise MedsegError(f"not a model package (no {schemas.MODEL_PACKAGE_JSON})", path)
    return path, "local"


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (NAME, ALIAS, None); ``models:/NAME/VERSION`` → (NAME, None, VERSION)."""
    rest = uri[len(MODELS_URI_PREFIX):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version and "/" not in name:
            return name, None, version
    raise MedsegError("expected models:/NAME@ALIAS or models:/NAME/VERSION", uri)


def registered_version(uri: str) -> str:
    """The version ``models:/NAME@ALIAS`` (or ``/latest``, or ``/VERSION``) points to now: one registry lookup, no download."""
    from mlflow.exceptions import MlflowException

    try:
        return _lookup_version(uri)
    except MlflowException as exc:
        raise MedsegError(f"cannot resolve the registered model ({exc.message})", uri) from None


def _lookup_version(uri: str) -> str:
    import mlflow

    from medseg.tracking import bound_http_retries

    bound_http_retries()  # a registry that is down: an error within about half a minute, not after minutes of retries
    name, alias, version = parse_models_uri(uri)
    client = mlflow.MlflowClient()
    if alias is not None:
        return str(client.get_model_version_by_alias(name, alias).version)
    if version is not None and version.lower() == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise MedsegError("registered model has no versions", uri)
        return str(max(int(v.version) for v in versions))
    return str(client.get_model_version(name, version).version)


def _download_registered(uri: str, download_dir: str | Path | None) -> tuple[Path, str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, _ = parse_models_uri(uri)
    try:
        version = _lookup_version(uri)
        # Download the pinned version, so an alias moved meanwhile cannot mix versions.
        dest = Path(download_dir) if download_dir else Path(tempfile.mkdtemp(prefix="medseg-model-"))
        dest.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{MODELS_URI_PREFIX}{name}/{version}", dst_path=str(dest)))
    except MlflowException as exc:
        raise MedsegError(f"cannot resolve the registered model ({exc.message})", uri) from None
    return _find_package(local, uri), version


def _find_package(root: Path, uri: str) -> Path:
    found = sorted(p.parent for p in root.rglob(schemas.MODEL_PACKAGE_JSON))
    # a cascade package holds its low-resolution stage as a package of its own: only outermost ones count
    found = [p for p in found if not any(q != p and q in p.parents for q in found)]
    if not found:
        raise MedsegError(f"the downloaded MLflow model holds no {schemas.MODEL_PACKAGE_JSON}", uri)
    preferred = [p for p in found if p.name == "model_package" and p.parent.name == "artifacts"]
    candidates = preferred or found
    if len(candidates) > 1:
        raise MedsegError(f"the downloaded MLflow model holds {len(candidates)} model packages: {', '.join(str(c.relative_to(root)) for c in candidates)}", uri)
    return candidates[0]
