"""Produce tests/data/panoptic_reference.json with panoptica itself. NOT run by the test suite.

panoptica needs numpy < 2.3 and brats-evaluation is AGPL, so neither is a project dependency; this
script runs in a throw-away venv that has them and only imports the case generator from here:

    python3.11 -m venv /tmp/panoptica-venv
    /tmp/panoptica-venv/bin/pip install brats-evaluation==0.0.10 panoptica==2.1.7
    /tmp/panoptica-venv/bin/python tests/data/make_panoptic_reference.py tests/data/panoptic_reference.json

Two matchers are recorded per case and region:

* ``brats2025``: brats-evaluation's bundled ``config_gli.yaml`` as shipped (``MaxBipartiteMatching``
  on DSC with threshold 1e-6, connected components, DSC / NSD / HD95 per instance);
* ``panoptica``: the same file with the matcher replaced by panoptica's default
  ``NaiveThresholdMatching(IOU, 0.5, allow_many_to_one=False)``.

Non-finite values are written as the strings "nan" / "inf" (JSON has no such numbers).
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import panoptic_cases  # noqa: E402

from brats_evaluation import config_path  # noqa: E402
from panoptica import Panoptica_Evaluator  # noqa: E402

GROUP_TO_REGION = {"wt": "WT", "tc": "TC", "netc": "NETC", "snfh": "SNFH", "et": "ET", "rc": "RC"}
KEYS = ("tp", "fp", "fn", "rq", "sq_dsc", "sq_hd95", "pq_dsc")


def _number(value):
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def evaluators() -> dict[str, Panoptica_Evaluator]:
    gli = Path(config_path("gli")).read_text()
    naive = re.sub(
        r"instance_matcher: !MaxBipartiteMatching \{[^}]*\}",
        "instance_matcher: !NaiveThresholdMatching {allow_many_to_one: false, matching_metric: !Metric IOU,\n  matching_threshold: 0.5}",
        gli,
        flags=re.S,
    )
    assert naive != gli, "could not replace the matcher in config_gli.yaml"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("brats2025", gli), ("panoptica", naive)):
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(text)
            out[name] = Panoptica_Evaluator.load_from_config(str(path))
    return out


def main() -> None:
    results: dict = {}
    for matcher, evaluator in evaluators().items():
        for case_id, (pred, ref, spacing) in panoptic_cases.cases().items():
            groups = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8), voxelspacing=tuple(spacing), verbose=False)
            for group, result in groups.items():
                values = result.to_dict()
                row = {k: _number(values[k]) for k in KEYS}
                results.setdefault(matcher, {}).setdefault(case_id, {})[GROUP_TO_REGION[group]] = row
    doc = {
        "note": (
            "Reference numbers from panoptica itself for tests/test_panoptic.py; cases built by "
            "tests/data/panoptic_cases.py (seed SEED there). Produced with tests/data/make_panoptic_reference.py "
            "in a throw-away venv (see its docstring for the exact commands)."
        ),
        "produced_with": {
            "python": platform.python_version(),
            "panoptica": metadata.version("panoptica"),
            "brats_evaluation": metadata.version("brats-evaluation"),
            "numpy": np.__version__,
            "connected_components_3d": metadata.version("connected-components-3d"),
            "scipy": metadata.version("scipy"),
        },
        "command": "/tmp/panoptica-venv/bin/python tests/data/make_panoptic_reference.py tests/data/panoptic_reference.json",
        "seed": panoptic_cases.SEED,
        "matchers": {
            "brats2025": "brats-evaluation config_gli.yaml: MaxBipartiteMatching(DSC, 1e-6)",
            "panoptica": "config_gli.yaml with NaiveThresholdMatching(IOU, 0.5, allow_many_to_one=False)",
        },
        "results": results,
    }
    Path(sys.argv[1]).write_text(json.dumps(doc, indent=1) + "\n")  # panoptica prints a banner on stdout


if __name__ == "__main__":
    main()
