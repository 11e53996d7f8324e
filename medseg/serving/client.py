"""Client of the model server: send the channel NIfTI files, get the segmentation and region volumes.

``medseg predict --url http://127.0.0.1:8080 --model NAME --images T1N T1C T2W T2F --out seg.nii.gz``
"""

from __future__ import annotations

import argparse
import base64
import gzip
import uuid
from pathlib import Path
from typing import Any

from medseg import schemas
from medseg.task import BRATS2023
from medseg.errors import MedsegError
from medseg.io import write_bytes


def build_request(image_paths: list[Path], channels: list[str], request_id: str | None = None) -> dict[str, Any]:
    """The V2 request body: one BYTES input per channel holding the base64 text of the file as stored."""
    if len(image_paths) != len(channels):
        raise MedsegError(f"got {len(image_paths)} image file(s) for {len(channels)} channel(s) ({', '.join(channels)})")
    inputs = []
    for path, channel in zip(image_paths, channels):
        path = Path(path)
        if not path.is_file():
            raise MedsegError("file not found", path)
        inputs.append({"name": channel, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(path.read_bytes()).decode("ascii")]})
    return {"id": request_id or str(uuid.uuid4()), "inputs": inputs}


def volume_request(images: Any, affine: Any, spacing: list[float] | None = None, channels: list[str] | None = None,
                   request_id: str | None = None, binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """A V2 request with the whole case as one FP32 input ``volume`` ``[C, Z, Y, X]``: ``(body, headers)``.

    ``images``: ``C×I×J×K`` (nibabel's voxel order, channels first), sent as ``images.transpose(0, 3, 2, 1)``;
    ``affine``: the 4×4 NIfTI voxel-to-world matrix of ``(i, j, k)``; ``spacing`` (optional): mm along (i, j, k).
    ``binary``: the binary tensor extension (the voxels as raw little-endian float32 after the JSON header),
    else the voxels as a JSON list (much larger and slower).
    """
    import json

    import numpy as np

    volume = np.ascontiguousarray(np.asarray(images, dtype="<f4").transpose(0, 3, 2, 1))
    params: dict[str, Any] = {"affine": json.dumps(np.asarray(affine, dtype=float).tolist())}
    if spacing is not None:
        params["spacing"] = json.dumps([float(s) for s in spacing])
    if channels is not None:
        params["channels"] = ",".join(channels)
    tensor: dict[str, Any] = {"name": "volume", "datatype": "FP32", "shape": list(volume.shape), "parameters": params}
    rid = request_id or str(uuid.uuid4())
    if not binary:
        tensor["data"] = volume.ravel().tolist()
        return json.dumps({"id": rid, "inputs": [tensor]}).encode(), {"content-type": "application/json", "x-request-id": rid}
    raw = volume.tobytes()
    tensor["parameters"]["binary_data_size"] = len(raw)
    header = json.dumps({"id": rid, "inputs": [tensor]}).encode()
    return header + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header)), "x-request-id": rid}


def infer_volume(url: str, model_name: str, images: Any, affine: Any, spacing: list[float] | None = None, binary: bool = True,
                 timeout: float = 300) -> dict[str, Any]:
    """Send a ``C×I×J×K`` array (see :func:`volume_request`); returns what :func:`infer` returns."""
    body, headers = volume_request(images, affine, spacing, binary=binary)
    return _post(f"{url.rstrip('/')}/v2/models/{model_name}/infer", body, headers, timeout)


def infer(url: str, model_name: str, image_paths: list[Path], channels: list[str] | None = None, timeout: float = 300) -> dict[str, Any]:
    """POST ``/v2/models/NAME/infer``; returns ``{"segmentation_bytes", "volumes_ml", "model_version", "model_name", "id"}``.

    ``segmentation_bytes`` is a ``.nii.gz`` file's content. Raises :class:`MedsegError` with the server's
    message on a 4xx/5xx answer, or when the server cannot be reached.
    """
    import json

    channels = list(channels or BRATS2023.channels)
    body = build_request(list(image_paths), channels)
    headers = {"x-request-id": body["id"], "content-type": "application/json"}  # KServe's latency log line shows the id
    return _post(f"{url.rstrip('/')}/v2/models/{model_name}/infer", json.dumps(body).encode(), headers, timeout)


def _post(endpoint: str, body: bytes, headers: dict[str, str], timeout: float) -> dict[str, Any]:
    import httpx

    try:
        response = httpx.post(endpoint, content=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise MedsegError(f"no answer within {timeout:.0f} s", endpoint) from None
    except httpx.HTTPError as exc:
        raise MedsegError(f"cannot reach the model server ({type(exc).__name__}: {exc})", endpoint) from None
    if response.status_code >= 400:
        raise MedsegError(f"model server answered {response.status_code}: {_error_text(response)}", endpoint)
    try:
        return parse_response(response.json())
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise MedsegError(f"unexpected answer from the model server ({type(exc).__name__}: {exc})", endpoint) from None


def parse_response(payload: dict[str, Any]) -> dict[str, Any]:
    outputs = {o["name"]: o for o in payload["outputs"]}
    seg = outputs["segmentation"]["data"]
    seg_text = seg[0] if isinstance(seg, list) else seg
    vol = outputs["volumes_ml"]
    regions = str((vol.get("parameters") or {}).get("regions", "")).split(",")
    values = [float(v) for v in vol["data"]]
    if len(regions) != len(values):
        raise ValueError(f"{len(values)} volumes for regions {regions}")
    params = payload.get("parameters") or {}
    return {
        "segmentation_bytes": base64.b64decode(seg_text, validate=True),
        "volumes_ml": dict(zip(regions, values)),
        "model_version": params.get("model_version") or payload.get("model_version"),
        "model_name": params.get("model_name") or payload.get("model_name"),
        "id": payload.get("id"),
    }


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    if isinstance(body, dict) and "detail" in body:  # pydantic validation (422)
        return str(body["detail"])[:500]
    return str(body)[:500]


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg predict``."""
    parser.add_argument("--url", required=True, help="model server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", required=True, help="model name on the server")
    parser.add_argument("--images", required=True, nargs="+", type=Path, help="one NIfTI file per channel, in --channels order")
    parser.add_argument("--channels", nargs="+", default=list(BRATS2023.channels),
                        help=f"channel names of --images (default: {' '.join(BRATS2023.channels)})")
    parser.add_argument("--out", required=True, type=Path, help="segmentation to write (.nii.gz, or .nii uncompressed)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer (default: 300)")


def run(args: argparse.Namespace) -> int:
    """Run ``medseg predict``: write the segmentation atomically and print the region volumes."""
    out = str(args.out)
    if not out.endswith((".nii.gz", ".nii")):
        raise MedsegError("the segmentation file name must end in .nii.gz or .nii", args.out)
    result = infer(args.url, args.model, args.images, args.channels, timeout=args.timeout)
    data = result["segmentation_bytes"]
    write_bytes(args.out, gzip.decompress(data) if out.endswith(".nii") else data)
    print(f"model:        {result['model_name']} (version {result['model_version']})")
    for region, ml in result["volumes_ml"].items():
        print(f"volume {region:<6} {ml:10.2f} ml")
    print(f"segmentation: {args.out}")
    return 0
