"""Where a registered model comes from, built in one place.

Every registered version carries the same lineage tags (:data:`LINEAGE_KEYS`):

==================  =====================================================================================
key                 where it is read
==================  =====================================================================================
manifest_hash       the dataset's ``manifest.json`` ``content_hash`` (the dataset version), else the package's
git_commit          the argument, else the package's lineage, else the source tree's (``MEDSEG_GIT_COMMIT``)
pipeline_run_id     the argument, else the package's lineage
plan_hash           the package's ``plans.json`` (:meth:`~medseg.schemas.Plans.content_hash`)
training_run_id     the package's training record (``mlflow_run_id``), else its lineage
medseg_version      the package's ``medseg_version`` (the code that trained it)
dataset_path        where the dataset was at registration (absolute), else the package's lineage
dataset_dvc_md5     what DVC recorded for that folder (``<folder>.dvc`` or ``dvc.lock``), else the package's lineage
git_dirty           ``true`` when the source tree the commit was read from had uncommitted changes to tracked files
==================  =====================================================================================

``"unknown"`` wherever a value is not known. The last three let ``medseg registry rebuild``
(:mod:`medseg.registry.rebuild`) find the data revision again and say when the commit may not hold the code
that trained the model. The register stage (:func:`medseg.registry.registry.register_model`)
and the register KFP component both call :func:`build_lineage`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medseg import schemas

LINEAGE_KEYS = ("manifest_hash", "git_commit", "pipeline_run_id", "plan_hash", "training_run_id", "medseg_version",
                "dataset_path", "dataset_dvc_md5", "git_dirty")
UNKNOWN = "unknown"


def _known(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text if text and text != UNKNOWN else None


def manifest_hash(dataset_dir: str | Path) -> str | None:
    """The dataset version: ``manifest.json``'s ``content_hash`` (computed when the field is empty)."""
    manifest = schemas.Manifest.load(Path(dataset_dir))
    return manifest.content_hash or manifest.compute_hash()


def _dvc_md5(dataset_dir: Path) -> str | None:
    """What DVC recorded for the dataset folder, if it tracks it (``None`` otherwise, also when DVC's files are unreadable)."""
    from medseg.data.dvc_remote import dvc_entry
    from medseg.errors import MedsegError

    try:
        return dvc_entry(dataset_dir)[0]
    except (MedsegError, ValueError):  # an unreadable dvc.lock must not stop a registration
        return None


def source_tree_dirty() -> str | None:
    """``"true"``/``"false"``: whether the source tree of this code has uncommitted changes to tracked files.

    ``None`` when it cannot tell (no git, an image built without .git, or ``MEDSEG_GIT_COMMIT`` naming the commit).
    """
    import os
    import subprocess

    if os.environ.get("MEDSEG_GIT_COMMIT"):
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return None if out.returncode != 0 else ("true" if out.stdout.strip() else "false")


def build_lineage(model_dir: str | Path, dataset_dir: str | Path | None = None, pipeline_run_id: str = "", git_commit: str | None = None) -> dict[str, str]:
    """The lineage tags of the model package in ``model_dir`` (see the module docstring).

    Args:
        model_dir: a model package folder (``model_package.json``, ``plans.json``).
        dataset_dir: the canonical dataset the model was trained and evaluated on (its ``manifest.json``).
        pipeline_run_id: the pipeline run registering the model ("" when not run by a pipeline).
        git_commit: the source commit; ``None``: the package's, else the source tree's.

    Returns:
        Every key of :data:`LINEAGE_KEYS` → a string (``"unknown"`` when not known).
    """
    model_dir = Path(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    recorded: Mapping[str, str] = {str(k): str(v) for k, v in (package.lineage or {}).items()}
    out: dict[str, str] = {}

    out["manifest_hash"] = (_known(manifest_hash(dataset_dir)) if dataset_dir is not None else None) or _known(recorded.get("manifest_hash")) or UNKNOWN
    commit = _known(git_commit) or _known(recorded.get("git_commit"))
    dirty = _known(recorded.get("git_dirty")) if commit is not None else None
    if commit is None:
        from medseg.tracking import git_commit as source_commit

        commit = _known(source_commit())
        dirty = source_tree_dirty() if commit is not None else None
    out["git_commit"] = commit or UNKNOWN
    out["pipeline_run_id"] = _known(pipeline_run_id) or _known(recorded.get("pipeline_run_id")) or UNKNOWN
    plan_hash = schemas.Plans.load(model_dir).content_hash() if (model_dir / schemas.PLANS_JSON).is_file() else None
    out["plan_hash"] = _known(plan_hash) or _known(recorded.get("plan_hash")) or UNKNOWN
    out["training_run_id"] = _known((package.training or {}).get("mlflow_run_id")) or _known(recorded.get("training_run_id")) or UNKNOWN
    out["medseg_version"] = _known(package.medseg_version) or _known(recorded.get("medseg_version")) or UNKNOWN
    # where the data were: a rebuild looks there first, then asks DVC for the recorded md5
    folder = Path(dataset_dir).resolve() if dataset_dir is not None else None
    out["dataset_path"] = (str(folder) if folder is not None else None) or _known(recorded.get("dataset_path")) or UNKNOWN
    out["dataset_dvc_md5"] = (_dvc_md5(folder) if folder is not None else None) or _known(recorded.get("dataset_dvc_md5")) or UNKNOWN
    out["git_dirty"] = dirty or UNKNOWN
    return out


def merge_lineage(base: Mapping[str, str], given: Mapping[str, object] | None) -> dict[str, str]:
    """``base`` with the known values of ``given`` over it (a caller's values win; empty / "unknown" ones do not).

    ``git_dirty`` describes the tree ``base``'s commit was read from: it is dropped (``unknown``) when ``given`` names
    another commit without saying whether that one was clean."""
    out = {str(k): str(v) for k, v in base.items()}
    given = dict(given or {})
    commit = _known(given.get("git_commit"))
    if commit is not None and commit != _known(out.get("git_commit")) and _known(given.get("git_dirty")) is None:
        out["git_dirty"] = UNKNOWN
    for key, value in given.items():
        known = _known(value)
        if known is not None:
            out[str(key)] = known
    for key in LINEAGE_KEYS:
        out.setdefault(key, UNKNOWN)
    return out


__all__ = ["LINEAGE_KEYS", "UNKNOWN", "build_lineage", "manifest_hash", "merge_lineage", "source_tree_dirty"]
