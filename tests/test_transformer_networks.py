"""TransUNet, UNETR and Swin UNETR: each trains from a plan on CPU and its package answers on the model server.

The plan here is the anisotropic one that used to break the transformers (a 64×64×12-voxel patch: UNETR takes
multiples of 16, Swin UNETR of 32): the planner records the patch each of them trains on
(``network_patch_sizes``), the trainer trains on it, the package records it and the predictor's sliding window
uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medseg import schemas

#: small transformer settings: the architecture, not the size, is under test on 2 shared cores
NETWORKS = {
    "transunet": {"hidden_size": 48, "num_layers": 2, "num_heads": 4},
    "unetr": {"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
    "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
}
FAST = dict(epochs=1, iterations_per_epoch=2, max_val_cases=1, device="cpu", seed=0, num_threads=2, batch_size=1)


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from medseg.ingest.ingest import ingest
    from medseg.preprocessing.preprocess import run_preprocessing
    from medseg.synth_layouts import generate_layout

    root = tmp_path_factory.mktemp("aniso")
    generate_layout("mets", root / "raw", 6, seed=1, shape=(64, 64, 16), progress=False, anatomy="procedural")
    ingest(root / "raw", root / "dataset", n_folds=2, test_fraction=0.2, seed=0, progress=False)
    plans = run_preprocessing(root / "dataset", root / "pre", budget="cpu", workers=1, progress=False, configuration="3d_fullres")
    return {"root": root, "dataset": root / "dataset", "pre": root / "pre", "plans": plans}


def test_the_plan_records_the_patch_each_transformer_trains_on(anisotropic: dict[str, Path]) -> None:
    config = anisotropic["plans"].configuration("3d_fullres")
    patch = config.patch_size
    sizes = config.network_patch_sizes
    assert all(p % 16 == 0 for p in sizes.get("unetr", patch)) and all(u >= p for u, p in zip(sizes.get("unetr", patch), patch))
    swin = sizes.get("swinunetr", patch)
    assert all(p % 32 == 0 for p in swin) and max(swin) >= 64
    assert "unet" not in sizes  # the U-Net takes the plan's own patch


@pytest.mark.slow  # three short trainings and three model servers: ~1-2 min on 2 shared cores
@pytest.mark.parametrize("network", list(NETWORKS))
def test_transformer_trains_from_the_plan_and_answers_on_the_endpoint(network: str, anisotropic: dict[str, Path], tmp_path: Path) -> None:
    from medseg.inference.predictor import Predictor
    from medseg.preprocessing.fingerprint import case_files
    from medseg.serving.client import infer
    from medseg.serving.server import free_port, start_server_process, stop_server, wait_until_ready
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import train

    cfg = TrainConfig(**FAST, network=network, network_options=NETWORKS[network])
    result = train(anisotropic["pre"], tmp_path / "run", cfg, progress=False)
    assert result.epochs_run == 1 and result.model_dir is not None
    package = schemas.ModelPackage.load(result.model_dir)
    config = anisotropic["plans"].configuration("3d_fullres")
    assert package.network["name"] == network
    assert package.network["patch_size"] == config.network_patch_sizes.get(network, config.patch_size)
    predictor = Predictor.from_package(result.model_dir)
    assert predictor.patch_size == package.network["patch_size"]

    dataset = schemas.DatasetJson.load(anisotropic["dataset"])
    case = schemas.Splits.load(anisotropic["dataset"]).test[0]
    images = case_files(anisotropic["dataset"], case, len(dataset.channel_names))
    port = free_port()
    proc = start_server_process(str(result.model_dir), network, port, env=dict(os.environ), log_file=tmp_path / "server.log")
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", network, 120, proc=proc)
        answer = infer(f"http://127.0.0.1:{port}", network, images, dataset.channels, timeout=120)
    finally:
        stop_server(proc)
    assert answer["segmentation_bytes"][:2] == b"\x1f\x8b"
    assert set(answer["volumes_ml"]) == set(predictor.task.reported_groups)
