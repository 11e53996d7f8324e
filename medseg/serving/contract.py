"""The endpoint contract of one loaded model: what it takes and answers, from its task and its package.

The task (:class:`medseg.task.Task`, from the package's ``dataset.json``) says what the endpoint of that kind of
task takes and returns (:meth:`~medseg.task.Task.endpoint_inputs`, :meth:`~medseg.task.Task.endpoint_outputs`);
the package says what this network actually uses (a classifier built without the age input ignores it).
:class:`Contract` joins the two, once per loaded version, for three readers:

- the request decoder (:meth:`Contract.input_spec`: channels, covariates and whether a 2D picture is taken);
- ``GET /v2/models/NAME`` (:meth:`Contract.metadata`: the V2 model metadata, every input and output with name,
  datatype, shape, ``optional`` and ``parameters``, and model-level ``parameters``);
- the answer (class names, reported groups, the label values of a mask).

No module here names a task's channels, labels or regions: they all come from the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from medseg.serving.decode import InputSpec
from medseg.task import Task

#: The ``platform`` field of the model metadata.
PLATFORM = "medseg_pytorch"


@dataclass(frozen=True)
class Contract:
    """What one model version's endpoint takes and returns."""

    task: Task
    channels: tuple[str, ...]
    covariates: tuple[tuple[str, bool], ...]  # (name, required) of the covariate inputs accepted
    classes: tuple[str, ...]  # a classifier's, in output order
    groups: tuple[str, ...]  # a segmentation model's reported groups (volumes_ml order)
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    min_shape: tuple[int, ...] | None = None  # smallest volume at the model's spacing (segmentation); None: no minimum

    @classmethod
    def of(cls, predictor: Any) -> Contract:
        """The contract of a :class:`~medseg.inference.predictor.Predictor` (its task, channels and network)."""
        task: Task = predictor.task
        channels = tuple(predictor.channels)
        uses_age = bool(getattr(predictor, "uses_age", False))
        inputs = []
        covariates = []
        for spec in task.endpoint_inputs():
            entry = spec.metadata()
            if spec.name in task.covariates:
                required = spec.name == "age" and uses_age  # the network says whether it takes it
                covariates.append((spec.name, required))
                entry.pop("optional", None)
                if not required:
                    entry["optional"] = True
            inputs.append(entry)
        classes = tuple(predictor.classes) if task.is_classification else ()
        return cls(task=task, channels=channels, covariates=tuple(covariates), classes=classes,
                   groups=tuple(task.reported_groups), inputs=tuple(inputs), outputs=tuple(s.metadata() for s in task.endpoint_outputs()),
                   min_shape=None if task.is_classification else minimum_shape(predictor))

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def is_classification(self) -> bool:
        return self.task.is_classification

    @property
    def foreground(self) -> list[int]:
        return list(self.task.foreground_labels)

    def input_spec(self) -> InputSpec:
        volume_min = self.min_shape if self.min_shape is not None and len(self.min_shape) == 3 else None  # a 2D window's minimum is per slice
        return InputSpec(self.channels, self.covariates, self.task.slice_axis if self.task.is_slice_set else None, volume_min)

    def parameters(self, version: str) -> dict[str, str]:
        """Model-level metadata parameters (V2 parameters are scalars: lists as comma-separated text)."""
        out = {"task": self.kind, "view": self.task.viewer_mode, "channels": ",".join(self.channels), "model_version": str(version)}
        if self.is_classification:
            out["classes"] = ",".join(self.classes)
        else:
            out["regions"] = ",".join(self.groups)
            out["labels"] = ",".join(f"{name}:{value}" for name, value in sorted(self.task.labels.items(), key=lambda kv: kv[1]))
            if self.task.is_slice_set:
                out["slice_axis"] = str(self.task.slice_axis)
        required = [name for name, needed in self.covariates if needed]
        if required:
            out["required_covariates"] = ",".join(required)
        return out

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """The V2 model metadata answer of ``GET /v2/models/NAME``."""
        return {"name": name, "versions": [str(version)], "platform": PLATFORM, "inputs": [dict(i) for i in self.inputs],
                "outputs": [dict(o) for o in self.outputs], "parameters": self.parameters(version)}


def minimum_shape(predictor: Any) -> tuple[int, ...] | None:
    """The smallest volume, per axis at the model's spacing, the network can segment: its total downsampling (the product
    of its strides), below which its coarsest feature map would hold less than one voxel of the case. Networks without
    strides in their configuration (transformers) use an eighth of their window. Smaller inputs than the window itself
    are fine (the sliding window pads them). A configuration ensemble: the largest of its 3D members' per axis."""
    members = getattr(predictor, "members", None)
    if members:
        shapes = [minimum_shape(m) for m in members]
        volumes = [s for s in shapes if s is not None and len(s) == 3]
        return tuple(max(axis) for axis in zip(*volumes)) if volumes else shapes[0]
    config = getattr(predictor, "config", None)
    network = getattr(config, "network", None)
    network = network if isinstance(network, dict) else {}
    strides = network.get("strides")
    if isinstance(strides, list) and strides and all(isinstance(s, (list, tuple)) for s in strides):
        return tuple(math.prod(int(s[axis]) for s in strides) for axis in range(len(strides[0])))
    patch = getattr(predictor, "patch_size", None)
    return tuple(max(1, math.ceil(int(p) / 8)) for p in patch) if patch else None


__all__ = ["Contract", "PLATFORM", "minimum_shape"]
