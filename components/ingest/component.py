from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("ingest"), **COMPONENT_OPTIONS)
def ingest(source: str, source_format: str, n_folds: int, test_fraction: float, seed: int, dataset: Output[Dataset]):
    """Validate a raw dataset and write the canonical dataset (nnU-Net raw layout, manifest, splits)."""
    from pathlib import Path

    from medseg.ingest.ingest import ingest as run_ingest

    manifest = run_ingest(Path(source), Path(dataset.path), fmt=source_format, n_folds=n_folds, test_fraction=test_fraction, seed=seed, progress=False)
    dataset.metadata.update({"n_cases": len(manifest.cases), "n_quarantined": len(manifest.quarantined), "content_hash": manifest.content_hash})
