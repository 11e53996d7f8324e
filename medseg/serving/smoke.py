"""Serve-and-check: start the real model server on 127.0.0.1, send one held-out case of the dataset over the V2
protocol in the form its task takes, check the answer has the task's outputs, write what came back. The
pipeline's serve step and the demo use it.

By task (:class:`medseg.task.Task` of the dataset):

- segmentation: the case's channel NIfTI files; the answer's segmentation is written (``<CASE>_seg.nii.gz``, an
  overlay PNG) and scored against the case's label: ``<GROUP>_dice`` per reported group;
- 2D slice set: the same with the stack, and one slice (the one with the most foreground in the label) sent as a
  picture (PNG of its colour channels, when the model has 1 or 3 channels): ``slice_ok`` says the mask came back as
  a PNG of the slice's size, ``slice_dice`` its Dice against the label's slice;
- classification: the case's image(s) and its age from the dataset's ``manifest.json`` (``cases[].covariates``)
  when the model requires it: ``label``, ``true_label``, ``label_correct`` and ``probabilities``.

Every result has ``endpoint_ok`` (the answer has the task's outputs in the right form, and ``/metrics`` answers),
``model_version``, ``case_id``, ``request_seconds``; it is written to ``smoke.json`` in ``out_dir``.
"""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.evaluation.metrics import dice
from medseg.io import AFFINE_ATOL_MM, load_nifti, load_nifti_bytes, write_bytes, write_json
from medseg.preprocessing.fingerprint import case_files, label_file
from medseg.serving.client import ModelInfo, infer, infer_image, model_info
from medseg.serving.image2d import decode_mask, pixels_from_volume
from medseg.serving.server import free_port, start_server_process, stop_server, wait_until_ready
from medseg.task import Task
from medseg.visualize import overlay_png


def smoke_test(model_uri: str, model_name: str, dataset_dir: Path, out_dir: Path, tracking_uri: str | None = None, case_id: str | None = None,
               timeout_s: float = 180) -> dict:
    """Returns ``{endpoint_ok, model_version, case_id, request_seconds, ...}`` and the task's checks (module docstring)."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    task = Task.from_dataset(schemas.DatasetJson.load(dataset_dir))
    if case_id is None:
        test = schemas.Splits.load(dataset_dir).test
        if not test:
            raise MedsegError("no held-out test case to send (splits.json has an empty test list)", dataset_dir / schemas.SPLITS_JSON)
        case_id = test[0]
    images = case_files(dataset_dir, case_id, len(task.channels))
    covariates = _case_covariates(dataset_dir, case_id) if task.is_classification else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server_process(model_uri, model_name, port, env=env, log_file=out_dir / schemas.SERVER_LOG)
    picture = None
    try:
        wait_until_ready(url, model_name, timeout_s, proc=proc)
        info = model_info(url, model_name)
        sent = {name: covariates.get(name) for name in info.covariates if covariates.get(name) is not None}
        missing = [name for name in info.requires if name not in sent]
        if missing:
            raise MedsegError(f"case {case_id} has no {', '.join(missing)} in {schemas.MANIFEST_JSON}, which model {model_name} requires", dataset_dir)
        t0 = time.perf_counter()
        answer = infer(url, model_name, images, info.channels, covariates=sent)
        seconds = time.perf_counter() - t0
        if info.takes_image and not task.is_classification:
            picture = _slice_request(url, model_name, dataset_dir, case_id, images, task)
        metrics_text = _get(f"{url}/metrics")
    finally:
        stop_server(proc)
    result: dict[str, Any] = {"endpoint_ok": False, "model_version": str(answer["model_version"]), "case_id": case_id, "request_seconds": round(seconds, 3)}
    if task.is_classification:
        result.update(_check_classification(answer, info, dataset_dir, case_id, sent))
    else:
        result.update(_check_segmentation(answer, info, task, dataset_dir, case_id, images, out_dir, model_name))
        if picture is not None:
            result.update(picture)
            result["endpoint_ok"] = bool(result["endpoint_ok"] and picture["slice_ok"])
    result["endpoint_ok"] = bool(result["endpoint_ok"] and "medseg_requests_total" in metrics_text)
    write_json(out_dir / schemas.SMOKE_JSON, result)
    return result


def _check_segmentation(answer: dict[str, Any], info: ModelInfo, task: Task, dataset_dir: Path, case_id: str, images: list[Path], out_dir: Path,
                        model_name: str) -> dict[str, Any]:
    seg_path = write_bytes(out_dir / f"{case_id}{schemas.SEGMENTATION_SUFFIX}", answer["segmentation_bytes"])
    seg, seg_affine, _ = load_nifti_bytes(answer["segmentation_bytes"], name=str(seg_path))
    image, affine, _ = load_nifti(images[-1])
    ref, _, _ = load_nifti(label_file(dataset_dir, case_id))
    ref = np.rint(ref).astype(np.uint8)
    seg = np.rint(seg).astype(np.uint8)
    overlay = out_dir / f"{case_id}{schemas.OVERLAY_SUFFIX}"
    overlay_png(image, seg, overlay, reference=ref, title=f"{case_id} · served by {model_name} v{answer['model_version']}")
    groups = task.reported_groups
    out: dict[str, Any] = {
        "endpoint_ok": bool(answer.get("task") == "segmentation" and seg.shape == ref.shape and np.allclose(seg_affine, affine, atol=AFFINE_ATOL_MM)
                            and list(answer["volumes_ml"]) == list(groups) == list(info.groups)),
        "volumes_ml": answer["volumes_ml"], "segmentation": str(seg_path), "overlay": str(overlay),
    }
    for group, values in groups.items():
        out[f"{group}_dice"] = round(dice(np.isin(seg, values), np.isin(ref, values)), 4)
    return out


def _check_classification(answer: dict[str, Any], info: ModelInfo, dataset_dir: Path, case_id: str, sent: dict[str, float]) -> dict[str, Any]:
    truth = _case_record(dataset_dir, case_id).get("class_label")
    probs = {k: round(float(v), 6) for k, v in answer.get("probabilities", {}).items()}
    ok = (answer.get("task") == "classification" and list(probs) == list(info.classes) and answer.get("label") in probs
          and all(0.0 <= p <= 1.0 for p in probs.values()) and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-3))
    return {"endpoint_ok": bool(ok), "label": answer.get("label"), "true_label": truth,
            "label_correct": None if truth is None else answer.get("label") == truth, "probabilities": probs, "covariates": sent}


def _slice_request(url: str, model_name: str, dataset_dir: Path, case_id: str, images: list[Path], task: Task) -> dict[str, Any] | None:
    """Send the slice with the most foreground as a PNG (1 or 3 channels); the mask must come back as a PNG of its size."""
    from PIL import Image

    if len(images) not in (1, 3) or task.slice_axis is None:
        return None
    axis = task.slice_axis
    ref = np.rint(load_nifti(label_file(dataset_dir, case_id))[0]).astype(np.uint8)
    counts = np.count_nonzero(ref, axis=tuple(a for a in range(3) if a != axis))
    k = int(np.argmax(counts))
    take = [slice(None)] * 3
    take[axis] = slice(k, k + 1)
    planes = [pixels_from_volume(load_nifti(p)[0][tuple(take)], axis) for p in images]
    pixels = np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    answer = infer_image(url, model_name, buf.getvalue())
    mask = decode_mask(answer["segmentation_bytes"]) if answer.get("format") == "png" else None
    truth = pixels_from_volume(ref[tuple(take)], axis)
    ok = mask is not None and mask.shape == truth.shape
    return {"slice_index": k, "slice_ok": bool(ok), "slice_dice": round(dice(mask > 0, truth > 0), 4) if ok else None}


def _case_record(dataset_dir: Path, case_id: str) -> dict[str, Any]:
    if not (dataset_dir / schemas.MANIFEST_JSON).is_file():
        return {}
    return next((c for c in schemas.Manifest.load(dataset_dir).cases if str(c.get("case_id")) == case_id), {})


def _case_covariates(dataset_dir: Path, case_id: str) -> dict[str, float]:
    """The case's numeric covariates (``age``) from the dataset's manifest."""
    values = _case_record(dataset_dir, case_id).get("covariates") or {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _get(url: str) -> str:
    import httpx

    try:
        return httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return ""
