"""The torch-free inference backend: a package's ``network.onnx`` in ONNX Runtime against the torch predictor.

Tiny on purpose (an untrained U-Net of the default CPU plan, 24³/12³ cases at 2 mm): what is checked is that the
two backends compute the same thing (windows, Gaussian weights, padding, mirroring, activation, restoring,
postprocessing), not how good the network is. The served path runs ``medseg serve`` with torch and MONAI hidden
by an import blocker, so it cannot fall back to torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.onnx_backend import ONNX_FILE, OnnxNetwork, onnx_logits
from medseg.inference.onnx_export import EXPORT_ENV, MAX_ABS_DIFF, refusal
from medseg.inference.predictor import Predictor, grid_probabilities, resolve_backend
from medseg.io import load_nifti, load_nifti_bytes
from tests.factories import make_model_package, write_case

ROOT = Path(__file__).resolve().parents[1]
PROB_TOLERANCE = 1e-4  # float32 rounding of two runtimes; the U-Net's logits differ by ~1e-5


@pytest.fixture(scope="module", autouse=True)
def export_at_packaging() -> Iterator[None]:
    """The suite switches the export off (tests/conftest.py); here every packaging exports, as in training."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXPORT_ENV, "1")
        yield


@pytest.fixture(scope="module")
def package(tmp_path_factory, export_at_packaging: None) -> Path:
    """An untrained package of the plan's U-Net (16³ windows), written by the trainer's save_model_package: the
    export runs there, as in training."""
    return make_model_package(tmp_path_factory.mktemp("onnx") / "model", patch=(16, 16, 16))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    both = float(a.sum() + b.sum())
    return 1.0 if both == 0 else 2.0 * float((a & b).sum()) / both


def test_packaging_writes_network_onnx_checked_against_torch(package: Path) -> None:
    info = schemas.ModelPackage.load(package).onnx
    assert info["file"] == ONNX_FILE and (package / ONNX_FILE).is_file(), info
    assert info["opset"] >= 17 and info["patch_size"] == [16, 16, 16]
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] < MAX_ABS_DIFF, info
    import onnx

    ops = {node.op_type for node in onnx.load(str(package / ONNX_FILE)).graph.node}
    assert "InstanceNormalization" not in ops and info["instance_norms_rewritten"] > 0, ops  # the precise rewrite
    net = OnnxNetwork(package / ONNX_FILE)
    assert net.spatial == [16, 16, 16] and net.in_channels == 4
    for batch in (1, 3):  # the batch axis is dynamic: a window batch of any size
        assert net(np.zeros((batch, 4, 16, 16, 16), np.float32)).shape == (batch, 4, 16, 16, 16)


def test_the_instance_norm_rewrite_is_closer_to_float64_than_onnx_runtimes_kernel() -> None:
    """Why the export rewrites InstanceNormalization: on one 64³ window with a large mean, ONNX Runtime's kernel is
    measurably off float64; the rewrite (nested one-axis means, two passes) is the same function, closer."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from medseg.inference.onnx_export import precise_instance_norm

    channels, edge = 2, 64
    graph = helper.make_graph(
        [helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-5)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, edge, edge, edge])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, edge, edge, edge])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "scale"), numpy_helper.from_array(np.array([0.0, -1.0], np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what opset 18 needs; the onnx package would write a newer one than ONNX Runtime 1.31 reads
    x = np.random.default_rng(0).normal(20.0, 0.5, (1, channels, edge, edge, edge)).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean((2, 3, 4), keepdims=True)) / np.sqrt(x64.var((2, 3, 4), keepdims=True) + 1e-5)
    expected = expected * np.array([1.0, 2.0]).reshape(1, 2, 1, 1, 1) + np.array([0.0, -1.0]).reshape(1, 2, 1, 1, 1)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    kernel = float(np.abs(run(model) - expected).max())
    assert precise_instance_norm(model, 3) == 1
    onnx.checker.check_model(model)
    rewritten = float(np.abs(run(model) - expected).max())
    print(f"instance norm vs float64 on a 64³ window: ONNX Runtime's kernel {kernel:.2e}, rewritten {rewritten:.2e}")
    assert rewritten < kernel and rewritten < 1e-4


def test_networks_not_checked_for_onnx_are_refused_with_a_reason() -> None:
    for network, words in (({"name": "unetr", "in_channels": 4, "out_channels": 4}, "unetr"),
                           ({"name": "classifier3d", "output": "classes", "classes": ["CN", "AD"]}, "classifiers"),
                           ({"name": "unet", "kernel_sizes": [[3, 3], [3, 3]]}, "3D")):
        reason = refusal(schemas.ModelPackage(configuration="3d_fullres", network=network, medseg_version="0"))
        assert reason and words in reason and "torch backend" in reason, reason
    assert refusal(schemas.ModelPackage(configuration="3d_fullres", network={"name": "resunet", "kernel_sizes": [[3, 3, 3]]}, medseg_version="0")) is None


def test_a_package_without_network_onnx_names_the_torch_backend(package: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(package, copy)
    (copy / ONNX_FILE).unlink()
    with pytest.raises(MedsegError, match="no network.onnx.*--backend torch"):
        Predictor.from_package(copy, device="cpu", backend="onnx")
    with pytest.raises(MedsegError, match="unknown inference backend"):
        resolve_backend("tensorrt")


@pytest.mark.parametrize("shape, mirror", [((24, 24, 24), True), ((12, 12, 12), False)], ids=["overlapping-windows-mirrored", "padded-to-one-window"])
def test_onnx_backend_matches_torch_probabilities_and_segmentation(package: Path, tmp_path: Path, shape: tuple[int, ...], mirror: bool) -> None:
    paths, _ = write_case(tmp_path / "case", shape=shape)
    torch_predictor = Predictor.from_package(package, device="cpu", mirror=mirror, backend="torch")
    onnx_predictor = Predictor.from_package(package, device="cpu", mirror=mirror, backend="onnx")
    assert (torch_predictor.backend, onnx_predictor.backend) == ("torch", "onnx")
    images, affine, _ = load_nifti(paths[0])
    stacked = np.stack([load_nifti(p)[0] for p in paths]).astype(np.float32)
    data, _ = torch_predictor.network_input(stacked, affine, [2.0, 2.0, 2.0])
    patch = torch_predictor.patch_size
    if shape == (24, 24, 24):
        assert any(s > p for s, p in zip(data.shape[1:], patch)), "the case should need several windows"
    else:
        assert all(s < p for s, p in zip(data.shape[1:], patch)), "the case should need padding"
    p_torch = grid_probabilities(torch_predictor.network, data, patch, torch_predictor.output, mirror=mirror, device=torch_predictor.device)
    p_onnx = grid_probabilities(onnx_predictor.network, data, patch, onnx_predictor.output, mirror=mirror)
    assert p_onnx.shape == p_torch.shape and p_onnx.dtype == np.float32
    difference = float(np.abs(p_onnx - p_torch).max())
    print(f"max abs difference of probabilities ({shape}, mirror={mirror}): {difference:.2e}")
    assert difference < PROB_TOLERANCE
    np.testing.assert_allclose(p_onnx.sum(0), 1.0, atol=1e-5)  # a softmax over labels

    seg_torch = torch_predictor.predict_files(paths).segmentation
    seg_onnx = onnx_predictor.predict_files(paths).segmentation
    assert seg_onnx.shape == images.shape == seg_torch.shape
    for label in np.union1d(np.unique(seg_torch), np.unique(seg_onnx)):
        assert dice(seg_torch == label, seg_onnx == label) >= 0.999, (label, dice(seg_torch == label, seg_onnx == label))


def test_a_fold_ensemble_is_exported_as_one_graph_of_its_mean(package: Path, tmp_path: Path) -> None:
    """An ensemble package (two folds of different weights) exports EnsembleNetwork as one graph: same probabilities as torch."""
    import shutil

    import torch

    from medseg.training.ensemble import save_ensemble_package

    other = tmp_path / "fold1"
    shutil.copytree(package, other)
    state = torch.load(other / schemas.WEIGHTS_FILE, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in state.items()}, other / schemas.WEIGHTS_FILE)
    ensemble = save_ensemble_package(tmp_path / "ensemble", [package, other])
    info = schemas.ModelPackage.load(ensemble).onnx
    assert info["file"] == ONNX_FILE and info["max_abs_diff"] < MAX_ABS_DIFF, info
    paths, _ = write_case(tmp_path / "case", shape=(24, 24, 24))
    predictors = [Predictor.from_package(ensemble, device="cpu", backend=b) for b in ("torch", "onnx")]
    stacked = np.stack([load_nifti(p)[0] for p in paths]).astype(np.float32)
    data, _ = predictors[0].network_input(stacked, load_nifti(paths[0])[1], [2.0, 2.0, 2.0])
    probs = [grid_probabilities(p.network, data, p.patch_size, p.output, device=p.device) for p in predictors]
    assert float(np.abs(probs[0] - probs[1]).max()) < PROB_TOLERANCE


def test_a_deep_supervised_unet_exports_its_full_resolution_head(package: Path, tmp_path: Path) -> None:
    """GPU plans train with deep supervision: the export (eval mode) has one output, the full-resolution logits."""
    import shutil

    import torch

    from medseg.inference.onnx_export import write_onnx
    from medseg.networks import build_network

    folder = tmp_path / "ds"
    shutil.copytree(package, folder)
    meta = schemas.ModelPackage.load(folder)
    meta.network = {**meta.network, "deep_supervision": True}
    meta.save(folder)
    torch.manual_seed(0)
    torch.save(build_network(meta.network).state_dict(), folder / schemas.WEIGHTS_FILE)
    info = write_onnx(folder)
    assert info["file"] == ONNX_FILE and info["max_abs_diff"] < MAX_ABS_DIFF, info
    net = OnnxNetwork(folder / ONNX_FILE)
    assert len(net.session.get_outputs()) == 1 and net(np.zeros((1, 4, 16, 16, 16), np.float32)).shape == (1, 4, 16, 16, 16)


def test_a_region_package_gets_the_sigmoid_and_the_same_label_map(package: Path, tmp_path: Path) -> None:
    """Region outputs (one sigmoid per overlapping region): the ONNX backend takes the task's activation and the same
    regions → labels conversion, so probabilities and segmentations match the torch backend's."""
    import shutil

    import torch

    from medseg.inference.onnx_export import write_onnx
    from medseg.networks import build_network
    from medseg.task import BRATS2023

    regions = tmp_path / "regions"
    shutil.copytree(package, regions)
    (regions / ONNX_FILE).unlink()
    meta = schemas.ModelPackage.load(regions)
    meta.network = {**meta.network, "out_channels": 3, "output": "regions", "regions": BRATS2023.regions_dict()}
    meta.save(regions)
    torch.manual_seed(0)
    torch.save(build_network(meta.network).state_dict(), regions / schemas.WEIGHTS_FILE)
    info = write_onnx(regions)
    assert info["file"] == ONNX_FILE and schemas.ModelPackage.load(regions).onnx == info
    paths, _ = write_case(tmp_path / "case", shape=(24, 24, 24))
    predictors = [Predictor.from_package(regions, device="cpu", backend=b) for b in ("torch", "onnx")]
    assert predictors[1].output == "regions"
    stacked = np.stack([load_nifti(p)[0] for p in paths]).astype(np.float32)
    data, _ = predictors[0].network_input(stacked, load_nifti(paths[0])[1], [2.0, 2.0, 2.0])
    probs = [grid_probabilities(p.network, data, p.patch_size, p.output, device=p.device) for p in predictors]
    assert probs[1].shape[0] == 3 and float(np.abs(probs[0] - probs[1]).max()) < PROB_TOLERANCE
    assert not np.allclose(probs[1].sum(0), 1.0, atol=1e-3)  # sigmoids per region, not a softmax
    segs = [p.predict_files(paths).segmentation for p in predictors]
    for label in np.union1d(np.unique(segs[0]), np.unique(segs[1])):
        assert dice(segs[0] == label, segs[1] == label) >= 0.999, label


def test_onnx_window_accumulation_of_an_identity_network_gives_the_input_back(tmp_path: Path) -> None:
    """The accumulation alone (an identity 'network'): the Gaussian-weighted average of identical windows gives the
    input back wherever it is covered, padded or not; catches any window/weight/crop mismatch independently of a runtime."""

    class Identity(OnnxNetwork):
        def __init__(self) -> None:  # no session: the accumulation is what is checked
            self.spatial = [8, 8, 8]

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            return batch

    rng = np.random.default_rng(0)
    for shape in ((2, 13, 8, 21), (1, 5, 6, 7)):
        data = rng.normal(size=shape).astype(np.float32)
        for mirror in (False, True):
            np.testing.assert_allclose(onnx_logits(Identity(), data, [8, 8, 8], overlap=0.5, mirror=mirror), data, atol=1e-5)


def test_medseg_predict_backend_onnx_writes_the_torch_segmentation(package: Path, tmp_path: Path) -> None:
    """``medseg predict --backend onnx`` (local, a folder) writes what ``--backend torch`` writes."""
    import shutil

    paths, _ = write_case(tmp_path / "raw", shape=(20, 22, 18))
    case = tmp_path / "in" / "CASE-000"
    case.mkdir(parents=True)
    channels = schemas.Plans.load(package).channel_names
    for path, channel in zip(paths, channels):
        shutil.copy(path, case / f"CASE-000-{channel}.nii.gz")
    segs = {}
    for backend in ("torch", "onnx"):
        out = subprocess.run([sys.executable, "-m", "medseg.cli", "predict", "--model", str(package), "--input", str(case.parent),
                              "--out", str(tmp_path / backend), "--backend", backend], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-3000:]
        segs[backend] = load_nifti(tmp_path / backend / "CASE-000.nii.gz")[0].astype(np.uint8)
    for label in np.union1d(np.unique(segs["torch"]), np.unique(segs["onnx"])):
        assert dice(segs["torch"] == label, segs["onnx"] == label) >= 0.999, label


# a meta path finder hiding torch and MONAI, as in a [serve] install without them; then the CLI
_HIDE_TORCH = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from medseg.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "monai")]
sys.exit(code)
"""


def test_the_serving_stack_imports_without_torch() -> None:
    """What ``medseg serve`` imports (server, model, predictor, preprocessing, registry lookup) loads with torch and
    MONAI hidden, and picks the ONNX backend by itself."""
    check = _HIDE_TORCH.split("from medseg.cli")[0] + (
        "import medseg.serving.server, medseg.serving.model, medseg.inference.predictor as p, medseg.registry.resolve\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')]\n"
        "print(p.resolve_backend('auto'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MEDSEG_INFERENCE_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "onnx"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_medseg_serve_without_torch_answers_v2_with_the_torch_segmentation(package: Path, tmp_path: Path) -> None:
    import httpx

    from medseg.serving import client, server
    from medseg.task import BRATS2023

    paths, _ = write_case(tmp_path / "case", shape=(24, 24, 24))
    port = server.free_port()
    log_file = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MEDSEG_INFERENCE_BACKEND", None)  # auto: the ONNX backend must be chosen because torch is absent
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _HIDE_TORCH, "serve", "--model", str(package), "--name", "brats", "--host", "127.0.0.1",
                                 "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            server.wait_until_ready(url, "brats", timeout_s=300, proc=proc)
        except MedsegError:
            pytest.fail(f"the torch-free model server did not start:\n{log_file.read_text()[-3000:]}")
        result = client.infer(url, "brats", paths, list(BRATS2023.channels), timeout=300)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        server.stop_server(proc)
    assert 'backend="onnx"' in metrics, [line for line in metrics.splitlines() if "medseg_model_info" in line]
    served, _, _ = load_nifti_bytes(result["segmentation_bytes"], dtype=np.uint8)
    expected = Predictor.from_package(package, device="cpu", backend="torch").predict_files(paths)
    assert served.shape == expected.segmentation.shape
    for label in np.union1d(np.unique(served), np.unique(expected.segmentation)):
        assert dice(served == label, expected.segmentation == label) >= 0.999, label
    assert set(result["volumes_ml"]) == set(expected.volumes_ml)
    for group, ml in expected.volumes_ml.items():  # a voxel at 2 mm is 0.008 ml: equal segmentations, equal volumes
        assert abs(result["volumes_ml"][group] - ml) <= 0.01 * max(ml, 1.0), (group, result["volumes_ml"][group], ml)


def test_export_switched_off_at_packaging_is_recorded_and_medseg_export_onnx_adds_it(tmp_path: Path) -> None:
    """MEDSEG_ONNX_EXPORT=0: the package says why it has no file, its logged model pins serve-torch; `medseg
    export-onnx` then writes the file (through a temporary name: nothing else is left in the folder) and the pin
    becomes serve."""
    from medseg.cli import main
    from medseg.registry.pyfunc_model import model_requirements

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXPORT_ENV, "0")
        old = make_model_package(tmp_path / "old", patch=(16, 16, 16))
    info = schemas.ModelPackage.load(old).onnx
    assert info["file"] is None and "medseg export-onnx" in info["reason"] and not (old / ONNX_FILE).exists()
    assert model_requirements(old)[0].startswith("medseg-ops[serve-torch]==")
    before = sorted(p.name for p in old.iterdir())

    assert main(["export-onnx", str(old)]) == 0
    info = schemas.ModelPackage.load(old).onnx
    assert info["file"] == ONNX_FILE and info["max_abs_diff"] <= MAX_ABS_DIFF
    assert sorted(p.name for p in old.iterdir()) == sorted([*before, ONNX_FILE])  # no temporary file left
    assert model_requirements(old)[0].startswith("medseg-ops[serve]==")
    paths, _ = write_case(tmp_path / "case", shape=(24, 24, 24))
    seg_torch = Predictor.from_package(old, device="cpu", backend="torch").predict_files(paths).segmentation
    seg_onnx = Predictor.from_package(old, device="cpu", backend="onnx").predict_files(paths).segmentation
    for label in np.union1d(np.unique(seg_torch), np.unique(seg_onnx)):
        assert dice(seg_torch == label, seg_onnx == label) >= 0.999


def test_medseg_export_onnx_refuses_a_folder_that_is_not_a_package_and_reports_refused_networks(tmp_path: Path, capsys) -> None:
    from medseg.cli import main
    from tests.factories import make_classifier_package

    assert main(["export-onnx", str(tmp_path)]) == 2
    assert "model_package.json" in capsys.readouterr().err
    classifier = make_classifier_package(tmp_path / "clf")
    assert main(["export-onnx", str(classifier)]) == 1
    assert "not exported: classifiers are served by the torch backend" in capsys.readouterr().out
    assert not (classifier / ONNX_FILE).exists()
