"""Serve-and-check: start the real model server on 127.0.0.1, send one held-out case over the V2
protocol, write what came back. The pipeline's serve step and the demo use it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.evaluation.metrics import dice
from medseg.io import AFFINE_ATOL_MM, load_nifti, load_nifti_bytes, write_bytes, write_json
from medseg.preprocessing.fingerprint import case_files, label_file
from medseg.serving.client import infer
from medseg.serving.server import free_port, start_server_process, stop_server, wait_until_ready
from medseg.visualize import overlay_png


def smoke_test(model_uri: str, model_name: str, dataset_dir: Path, out_dir: Path, tracking_uri: str | None = None, case_id: str | None = None, timeout_s: float = 180) -> dict:
    """Returns {endpoint_ok, model_version, case_id, request_seconds, volumes_ml, wt/tc/et dice of the case}."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dataset = schemas.DatasetJson.load(dataset_dir)
    if case_id is None:
        test = schemas.Splits.load(dataset_dir).test
        if not test:
            raise MedsegError("no held-out test case to send (splits.json has an empty test list)", dataset_dir / schemas.SPLITS_JSON)
        case_id = test[0]
    images = case_files(dataset_dir, case_id, len(dataset.channel_names))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server_process(model_uri, model_name, port, env=env, log_file=out_dir / "server.log")
    try:
        wait_until_ready(url, model_name, timeout_s, proc=proc)
        t0 = time.perf_counter()
        answer = infer(url, model_name, images, dataset.channels)
        seconds = time.perf_counter() - t0
        metrics_text = _get(f"{url}/metrics")
    finally:
        stop_server(proc)
    seg_path = write_bytes(out_dir / f"{case_id}_seg.nii.gz", answer["segmentation_bytes"])
    seg, seg_affine, _ = load_nifti_bytes(answer["segmentation_bytes"], name=str(seg_path))
    image, affine, _ = load_nifti(images[-1])
    ref, _, _ = load_nifti(label_file(dataset_dir, case_id))
    ref = np.rint(ref).astype(np.uint8)
    seg = np.rint(seg).astype(np.uint8)
    overlay_png(image, seg, out_dir / f"{case_id}_overlay.png", reference=ref, title=f"{case_id} · served by {model_name} v{answer['model_version']}")
    result = {
        "endpoint_ok": bool(seg.shape == ref.shape and np.allclose(seg_affine, affine, atol=AFFINE_ATOL_MM) and "medseg_requests_total" in metrics_text),
        "model_version": str(answer["model_version"]),
        "case_id": case_id,
        "request_seconds": round(seconds, 3),
        "volumes_ml": answer["volumes_ml"],
        "segmentation": str(seg_path),
        "overlay": str(out_dir / f"{case_id}_overlay.png"),
    }
    for region, values in dataset.regions.items():
        result[f"{region.lower()}_dice"] = round(dice(np.isin(seg, values), np.isin(ref, values)), 4)
    write_json(out_dir / "smoke.json", result)
    return result


def _get(url: str) -> str:
    import httpx

    try:
        return httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return ""
