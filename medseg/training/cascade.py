"""Training a 3d_lowres → 3d_fullres cascade's full-resolution stage (nnU-Net's ``3d_cascade_fullres``).

Before the full-resolution network trains, the low-resolution model (``TrainConfig.cascade_from``, ``medseg
train --cascade-from``) segments every training case of the preprocessed folder, and that segmentation is
brought onto the case's full-resolution grid (:func:`~medseg.inference.cascade.previous_stage_on_grid`) and
stored as ``<case>_prev.npy`` in ``<preprocessed>/3d_cascade_fullres/`` with a ``cascade.json`` saying which
model predicted what. The full-resolution network then takes the images plus one binary channel per
foreground label of that map (:class:`~medseg.training.sampler.CascadeCase`).

Out-of-fold, as nnU-Net: the full-resolution stage must learn how far to trust the low-resolution stage on
images that stage has not seen, as at inference. When the low-resolution model is a fold ensemble
(``medseg train --fold all``), each case is predicted by the member whose validation fold holds it (the one
that did not train on it). A case that every available member trained on (a single-fold model, or a fold
missing from the ensemble) is predicted by the whole model, and a warning says how many: in-sample
predictions are better than what inference will see, so the full-resolution stage learns to over-trust them.

The low-resolution segmentation of a preprocessed case is computed exactly as
:meth:`~medseg.inference.predictor.Predictor.predict` of the low-resolution package would compute it from the
raw images (same preprocessed data, sliding window, restoring to the original grid; no postprocessing), and
then goes through the same function as at inference, so training and inference maps agree.

Assumption: the low-resolution model was trained on this preprocessed folder (same plans, checked; same
``splits.json``, which packages do not record).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.cascade import PREVIOUS_STAGE_DIR, foreground_labels, previous_stage_on_grid, previous_stage_spec
from medseg.io import atomic_dir, read_json, save_npy, sha256_file, write_json
from medseg.preprocessing.preprocess import training_case_ids

log = logging.getLogger(__name__)

CASCADE_MANIFEST = schemas.CASCADE_JSON
PREV_SUFFIX = schemas.CASE_PREVIOUS_STAGE_SUFFIX
MANIFEST_FORMAT = 1


@dataclass
class PreviousStage:
    """The prepared previous stage of a cascade: where its maps are and what the package records."""

    folder: Path  # <case>_prev.npy and cascade.json
    package_dir: Path  # the low-resolution model package
    labels: list[int]  # foreground labels: the extra input channels, in order
    manifest: dict[str, Any]

    def package_entry(self, image_channels: int) -> dict[str, Any]:
        """The full-resolution package's ``previous_stage`` (its ``package`` folder is filled in when copied)."""
        m = self.manifest
        return {"configuration": m["previous_configuration"], "package": PREVIOUS_STAGE_DIR, "labels": list(self.labels),
                "image_channels": int(image_channels), "source": str(self.package_dir), "digest": m["lowres_digest"],
                "training_maps": {"out_of_fold": m["n_out_of_fold"], "in_sample": m["n_in_sample"], "overlap": m["overlap"], "mirror": m["mirror"]}}


def cascade_folder(preprocessed_dir: str | Path, configuration: str = "3d_fullres") -> Path:
    """Where the previous-stage maps of ``configuration`` live: ``<preprocessed>/3d_cascade_fullres`` for 3d_fullres."""
    name = "3d_cascade_fullres" if configuration == "3d_fullres" else f"cascade_{configuration}"
    return Path(preprocessed_dir) / name


def resolve_lowres_package(path: str | Path) -> Path:
    """A model package folder, or a training folder holding one in ``model/``.

    Raises:
        MedsegError: neither.
    """
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / schemas.MODEL_PACKAGE_JSON).is_file():
            return candidate
    raise MedsegError(f"--cascade-from must be a model package (a folder with {schemas.MODEL_PACKAGE_JSON}) or a training folder holding one in model/", path)


def package_digest(model_dir: Path, package: schemas.ModelPackage) -> str:
    """sha256 over a package's configuration, network and weights files: which model made the maps."""
    from medseg.training.ensemble import member_weights

    h = hashlib.sha256(f"{package.configuration}|{sorted(package.network.items())!r}|".encode())
    for name in member_weights(package):
        h.update(f"{name}:{sha256_file(model_dir / name)};".encode())
    return h.hexdigest()


def _check_plans(lowres_dir: Path, package: schemas.ModelPackage, plans: schemas.Plans, preprocessed_dir: Path) -> None:
    low_plans = schemas.Plans.load(lowres_dir)
    name = package.configuration
    if name not in plans.configurations:
        raise MedsegError(f"the low-resolution model was trained on configuration {name!r}, which {preprocessed_dir / schemas.PLANS_JSON} does not plan")
    same = (low_plans.configurations.get(name) == plans.configurations[name] and list(low_plans.channel_names) == list(plans.channel_names)
            and low_plans.normalization == plans.normalization and dict(low_plans.labels) == dict(plans.labels))
    if not same:
        raise MedsegError(f"the low-resolution model was trained on other plans than {preprocessed_dir} (configuration {name!r}, channels, "
                          "normalisation or labels differ): train both stages on one preprocessed folder", lowres_dir)
    if not (preprocessed_dir / name).is_dir():
        raise MedsegError(f"configuration {name!r} was not preprocessed: rerun preprocess with --configurations 3d_fullres {name}", preprocessed_dir / name)


def _assignment(package: schemas.ModelPackage, splits: schemas.Splits, case_ids: list[str]) -> dict[str, int | None]:
    """Case → the member (fold) that predicts it out of fold, or None (every member trained on it)."""
    from medseg.training.ensemble import is_ensemble

    if is_ensemble(package):
        folds = [int(m["fold"]) for m in (package.training.get("ensemble") or {}).get("members", [])]
    else:
        folds = [int(package.training.get("config", {}).get("fold", 0))]
    out: dict[str, int | None] = {}
    for case in case_ids:
        held_out = [f for f in folds if 0 <= f < len(splits.folds) and case in splits.folds[f].get("val", [])]
        out[case] = held_out[0] if held_out else None
    return out


def _predictors(lowres_dir: Path, package: schemas.ModelPackage, device: torch.device, overlap: float, mirror: bool) -> dict[int | None, Any]:
    """fold → a Predictor of that member alone; None → the whole model (every member)."""
    from medseg.inference.predictor import Predictor
    from medseg.training.ensemble import is_ensemble, load_member_states, load_network
    from medseg.networks.unet import build_network

    plans, dataset = schemas.Plans.load(lowres_dir), schemas.DatasetJson.load(lowres_dir)
    predictors: dict[int | None, Any] = {None: Predictor(load_network(lowres_dir, package, device), plans, dataset, package, device, overlap, mirror)}
    if is_ensemble(package):
        members = (package.training.get("ensemble") or {}).get("members", [])
        for member, state in zip(members, load_member_states(lowres_dir, package, device)):
            network = build_network(package.network)
            network.load_state_dict(state)
            predictors[int(member["fold"])] = Predictor(network.to(device).eval(), plans, dataset, package, device, overlap, mirror)
    else:
        predictors[int(package.training.get("config", {}).get("fold", 0))] = predictors[None]
    return predictors


def _cases_digest(preprocessed_dir: Path, configurations: list[str], case_ids: list[str]) -> str:
    """sha256 over the cases' properties files (crop box, shapes, sampled locations) in both configurations:
    preprocessing the data again invalidates the maps even when the plan stays the same."""
    h = hashlib.sha256()
    for name in configurations:
        for case in case_ids:
            path = preprocessed_dir / name / f"{case}{schemas.CASE_PROPERTIES_SUFFIX}"
            h.update(f"{name}/{case}:{sha256_file(path) if path.is_file() else 'missing'};".encode())
    return h.hexdigest()


def _reusable(folder: Path, wanted: dict[str, Any], case_ids: list[str]) -> dict[str, Any] | None:
    path = folder / CASCADE_MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    keys = ("format", "configuration", "previous_configuration", "lowres_digest", "labels", "overlap", "mirror", "plans_hash", "cases_digest")
    if any(manifest.get(k) != wanted[k] for k in keys):
        return None
    if not set(case_ids) <= set(manifest.get("cases", {})) or not all((folder / f"{c}{PREV_SUFFIX}").is_file() for c in case_ids):
        return None
    return manifest


def prepare_previous_stage(preprocessed_dir: str | Path, lowres: str | Path, configuration: str = "3d_fullres", device: torch.device | str = "cpu",
                           overlap: float = 0.5, mirror: bool = False, progress: bool = True) -> PreviousStage:
    """Predict the low-resolution model on every training case and store the maps on the ``configuration`` grid.

    Reuses the folder when its ``cascade.json`` says it holds the maps of this model and these settings;
    otherwise writes it anew (atomically). See the module docstring for the out-of-fold rule.

    Raises:
        MedsegError: ``lowres`` is not a model package, is itself a cascade or a classifier, was trained on
            other plans, or its configuration was not preprocessed.
    """
    from medseg.training.ensemble import network_output

    preprocessed_dir = Path(preprocessed_dir)
    lowres_dir = resolve_lowres_package(lowres)
    package = schemas.ModelPackage.load(lowres_dir)
    if previous_stage_spec(package):
        raise MedsegError("the low-resolution model is itself a cascade: cascades of more than two stages are not supported", lowres_dir)
    if network_output(package.network) == "classes":
        raise MedsegError("the previous stage of a cascade must be a segmentation model, this one is a classifier", lowres_dir)
    plans, splits = schemas.Plans.load(preprocessed_dir), schemas.Splits.load(preprocessed_dir)
    config = plans.configuration(configuration)
    if package.configuration == configuration:
        log.warning("the previous stage was trained on %s, the configuration of this stage too: a cascade normally goes from 3d_lowres to 3d_fullres", configuration)
    _check_plans(lowres_dir, package, plans, preprocessed_dir)
    case_ids = training_case_ids(splits)
    labels = foreground_labels(plans.labels)
    folder = cascade_folder(preprocessed_dir, configuration)
    wanted = {"format": MANIFEST_FORMAT, "configuration": configuration, "previous_configuration": package.configuration, "lowres_digest": package_digest(lowres_dir, package),
              "labels": labels, "overlap": float(overlap), "mirror": bool(mirror), "plans_hash": plans.content_hash(),
              "cases_digest": _cases_digest(preprocessed_dir, [package.configuration, configuration], case_ids)}
    manifest = _reusable(folder, wanted, case_ids)
    if manifest is not None:
        if progress:
            log.info("previous-stage maps of %s reused from %s", lowres_dir, folder)
        return PreviousStage(folder, lowres_dir, labels, manifest)

    device = torch.device(device)
    assignment = _assignment(package, splits, case_ids)
    predictors = _predictors(lowres_dir, package, device, overlap, mirror)
    in_sample = sorted(c for c, f in assignment.items() if f is None)
    if in_sample:
        log.warning("%d of %d training case(s) are predicted by a low-resolution model that trained on them (in-sample, e.g. %s): the full-resolution "
                    "stage will learn to over-trust the previous stage. Train the low-resolution stage on every fold (medseg train --config %s --fold all) "
                    "for out-of-fold predictions", len(in_sample), len(case_ids), ", ".join(in_sample[:3]), package.configuration)
    low_folder, full_folder = preprocessed_dir / package.configuration, preprocessed_dir / configuration
    cases: dict[str, dict[str, Any]] = {}
    with atomic_dir(folder) as tmp:
        for i, case in enumerate(case_ids):
            for f in (low_folder / f"{case}{schemas.CASE_IMAGE_SUFFIX}", low_folder / f"{case}{schemas.CASE_PROPERTIES_SUFFIX}",
                      full_folder / f"{case}{schemas.CASE_PROPERTIES_SUFFIX}"):
                if not f.is_file():
                    raise MedsegError(f"preprocessed case {case} is missing (rerun preprocess?)", f)
            fold = assignment[case]
            low_props = schemas.CaseProperties.load(low_folder / f"{case}{schemas.CASE_PROPERTIES_SUFFIX}")
            data = np.load(low_folder / f"{case}{schemas.CASE_IMAGE_SUFFIX}")
            segmentation = predictors[fold].segment_preprocessed(data, low_props)
            prev = previous_stage_on_grid(segmentation, schemas.CaseProperties.load(full_folder / f"{case}{schemas.CASE_PROPERTIES_SUFFIX}"), config)
            save_npy(tmp / f"{case}{PREV_SUFFIX}", prev)
            cases[case] = {"predicted_by": "all members" if fold is None else f"fold {fold}", "out_of_fold": fold is not None,
                           "foreground_voxels": int((prev > 0).sum())}
            if progress:
                log.info("previous stage %d/%d: %s (%s)", i + 1, len(case_ids), case, cases[case]["predicted_by"])
        manifest = {**wanted, "lowres_package": str(lowres_dir.resolve()), "n_out_of_fold": len(case_ids) - len(in_sample), "n_in_sample": len(in_sample), "cases": cases}
        write_json(tmp / CASCADE_MANIFEST, manifest)
    return PreviousStage(folder, lowres_dir, labels, manifest)


def copy_previous_stage(lowres_dir: Path, model_dir: Path) -> Path:
    """Copy the low-resolution package into ``model_dir/previous_stage`` (the cascade package is self-contained)."""
    dest = Path(model_dir) / PREVIOUS_STAGE_DIR
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(Path(lowres_dir), dest, ignore=shutil.ignore_patterns(PREVIOUS_STAGE_DIR))
    return dest


def cascade_cases(preprocessed_dir: Path, configuration: str, ids: list[str], stage: PreviousStage) -> list[Any]:
    """The :class:`~medseg.training.sampler.CascadeCase` of ``ids``."""
    from medseg.training.sampler import CascadeCase

    return [CascadeCase(preprocessed_dir / configuration, c, stage.folder, stage.labels) for c in ids]


# --------------------------------------------------------------------------- fold ensembles of cascades
def members_previous_stage(members: list[Path]) -> dict[str, Any]:
    """The shared ``previous_stage`` of cascade fold packages (empty when they are not cascades).

    Raises:
        MedsegError: members with different previous stages (or cascade and plain members mixed).
    """
    specs = [previous_stage_spec(schemas.ModelPackage.load(m)) for m in members]
    digests = {s.get("digest") if s else None for s in specs}
    if len(digests) > 1:
        raise MedsegError("the fold packages were trained on different previous stages (or some without one): they cannot form one ensemble")
    return specs[0] if specs else {}


def cross_validation_postprocessing(preprocessed_dir: str | Path, members: list[Path], max_val_cases: int = 8, overlap: float = 0.25,
                                    device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, float]]:
    """:func:`medseg.training.ensemble.cross_validation_postprocessing` for cascade members: their validation
    cases get the previous-stage channels from the maps in the preprocessed folder."""
    from medseg.evaluation.metrics import dice
    from medseg.inference.package import load_network, network_output, network_patch_size
    from medseg.task import Task
    from medseg.training.validation import postprocessing_from_pairs, validation_pairs

    preprocessed_dir, device = Path(preprocessed_dir), torch.device(device)
    plans, splits = schemas.Plans.load(preprocessed_dir), schemas.Splits.load(preprocessed_dir)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    configuration = None
    for i, folder in enumerate(members):
        package = schemas.ModelPackage.load(folder)
        configuration = package.configuration
        spec = previous_stage_spec(package)
        fold = int(package.training.get("config", {}).get("fold", i))
        maps = cascade_folder(preprocessed_dir, package.configuration)
        manifest = read_json(maps / CASCADE_MANIFEST) if (maps / CASCADE_MANIFEST).is_file() else {}
        if manifest.get("lowres_digest") != spec.get("digest"):
            raise MedsegError(f"the previous-stage maps in {maps} are not those fold {fold} was trained with", maps)
        stage = PreviousStage(maps, Path(spec.get("source", "")), [int(v) for v in spec["labels"]], manifest)
        cases = cascade_cases(preprocessed_dir, package.configuration, splits.folds[fold]["val"][:max_val_cases], stage)
        regions = package.network.get("regions") if network_output(package.network) == "regions" else None
        pairs += validation_pairs(load_network(folder, package, device), cases, network_patch_size(package, plans), overlap, device, regions,
                                  sorted(int(v) for v in plans.labels.values()))
    if not pairs or configuration is None:
        return {}, {}
    task = Task.from_folder(preprocessed_dir)
    cv_dice = {name: float(np.mean([dice(np.isin(p, v), np.isin(r, v)) for p, r in pairs])) for name, v in task.reported_groups.items()}
    post = postprocessing_from_pairs(pairs, plans, list(plans.configuration(configuration).spacing), task)
    if post:
        post["chosen_on"] = "out-of-fold predictions of the cross-validation"
    return post, cv_dice


def attach_previous_stage(model_dir: Path, member_dir: Path) -> Path:
    """Give an ensemble package of cascade folds its previous stage: the first member's ``previous_stage``
    folder copied in and recorded in ``model_package.json``."""
    member = schemas.ModelPackage.load(member_dir)
    spec = previous_stage_spec(member)
    if not spec:
        return model_dir
    copy_previous_stage(Path(member_dir) / str(spec["package"]), model_dir)
    package = schemas.ModelPackage.load(model_dir)
    package.previous_stage = {**spec, "package": PREVIOUS_STAGE_DIR}
    package.save(model_dir)
    return model_dir


__all__ = ["CASCADE_MANIFEST", "PREV_SUFFIX", "PreviousStage", "attach_previous_stage", "cascade_cases", "cascade_folder", "copy_previous_stage",
           "cross_validation_postprocessing", "members_previous_stage", "package_digest", "prepare_previous_stage", "resolve_lowres_package"]
