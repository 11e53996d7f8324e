"""``medseg registry rebuild``: train a registered version again from its lineage and check it comes out the same.

A version's lineage (:mod:`medseg.registry.lineage`) names the data (``manifest_hash``; where they were:
``dataset_path``, ``dataset_dvc_md5``), the code (``git_commit``), the plan (``plan_hash``) and the training run.
The rebuild, in order, refusing with one clear line at the first step that cannot be done (before the costly ones
where it can):

1. read the version: its tags, its run's ``test_*`` metrics, and the registered model package (downloaded), whose
   ``plans.json`` must hash to ``plan_hash`` and whose ``training.config`` holds every training parameter (cross-
   checked against the parameters the training run logged, when that run is in the same tracking store);
2. find the commit in the git repository;
3. find the data: ``--dataset``, else the recorded ``dataset_path``, else the recorded DVC md5 (from DVC's cache,
   else pulled from the default remote, e.g. S3). A folder is used only when its ``manifest.json`` has the recorded
   hash and every file it lists has the sha256 the manifest says;
4. check the commit out in a temporary ``git worktree`` and run *that commit's* ``medseg`` (this Python, with the
   worktree alone providing the ``medseg`` package) to preprocess with the registered plan, train with the
   registered parameters (no MLflow logging), and evaluate the dataset's test split;
5. compare the test set (case keys), every reported metric (the task's primary metric of each group must be within
   the tolerance), and the weights tensor by tensor (expected bitwise equal for a ``deterministic`` CPU run).

The worktree, and data fetched from DVC, are removed afterwards, also on failure; the other artefacts too unless
a work folder is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import sha256_file, write_text
from medseg.registry.gate import _number  # the gate's reading of a stored metric (finite float, else None)
from medseg.registry.lineage import LINEAGE_KEYS, UNKNOWN
from medseg.task import Task

log = logging.getLogger(__name__)

#: Default largest accepted difference of the task's primary metric (Dice for segmentation), per group.
DEFAULT_TOLERANCE = 0.01
#: Evaluation overlap when the commit's ``params.yaml`` does not say (the pipeline's default).
DEFAULT_OVERLAP = 0.5
#: Training parameters that describe the machine, not the recipe: not compared with the training run's.
MACHINE_PARAMS = ("device", "num_threads")
#: How the training run logs a value resolved when the run starts (``auto``, an empty mapping or string).
_FILLED_AT_START = ("auto", "{}", "", "None")
_COMMIT_ID = re.compile(r"^[0-9a-fA-F]{7,64}$")
_TAIL_LINES = 15

# Runs the worktree's CLI with this interpreter. setuptools' editable install of the working tree appends a finder
# to sys.meta_path that would resolve a module missing from the worktree to the working tree's copy: it is removed,
# so that only the commit's code runs, and the import is checked.
_BOOTSTRAP = """import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__name__", type(f).__name__).lower()]
root = sys.argv.pop(1)
import medseg
if not str(medseg.__file__).startswith(root):
    sys.exit(f"medseg was imported from {medseg.__file__}, not from the worktree {root}")
sys.argv[0] = "medseg"
runpy.run_module("medseg.cli", run_name="__main__", alter_sys=True)
"""


def _known(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text if text and text != UNKNOWN else None


# --------------------------------------------------------------------------- 1. the registered version
@dataclass
class RegisteredVersion:
    """What the registry holds about one version: tags (lineage, task, test set), its run's metrics, its package."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]
    package_dir: Path

    def lineage(self, key: str) -> str | None:
        """A lineage tag's value, ``None`` when absent or ``unknown``."""
        return _known(self.tags.get(key))


def read_version(name: str, version: str, tracking_uri: str, download_dir: Path) -> RegisteredVersion:
    """The version's tags, its run's metrics, and its model package downloaded into ``download_dir``.

    Raises:
        MedsegError: no such model or version, or no model package in it.
    """
    from mlflow.exceptions import MlflowException

    from medseg.registry.registry import _client, _get_version, _tracking
    from medseg.registry.resolve import resolve_model_source

    client = _client(tracking_uri)
    mv = _get_version(client, name, version)
    try:
        metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    except MlflowException:
        raise MedsegError(f"the run {mv.run_id} of {name} v{mv.version} is not in the tracking store: its registered metrics are unknown") from None
    with _tracking(tracking_uri):  # the download resolves models:/ through MLflow's fluent API
        package_dir, _ = resolve_model_source(f"models:/{name}/{mv.version}", download_dir)
    return RegisteredVersion(name, str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}), metrics, package_dir)


def training_config(package_dir: Path) -> dict[str, Any]:
    """Every training parameter of the registered package (``training.config``: ``auto`` already resolved).

    Raises:
        MedsegError: an ensemble or a cascade (not rebuilt: several trainings), or a package without its config.
    """
    package = schemas.ModelPackage.load(package_dir)
    if package.configuration_ensemble:
        raise MedsegError(f"the version is a configuration ensemble ({package.configuration}: several trainings chosen by cross-validation): "
                          "rebuilding it is not supported", package_dir)
    if package.training.get("ensemble"):
        raise MedsegError("the version is a fold ensemble: rebuilding it (one training per fold) is not supported", package_dir)
    config = package.training.get("config")
    if package.previous_stage or (isinstance(config, Mapping) and config.get("cascade_from")):
        raise MedsegError("the version is a cascade (two trainings): rebuilding it is not supported", package_dir)
    if not isinstance(config, Mapping) or not config:
        raise MedsegError("the package records no training config (training.config): its parameters are unknown", package_dir / schemas.MODEL_PACKAGE_JSON)
    return dict(config)


def check_plan(package_dir: Path, plan_hash: str | None) -> schemas.Plans:
    """The registered package's plan, checked against the lineage's ``plan_hash``.

    Raises:
        MedsegError: no plan hash recorded, or the package's ``plans.json`` hashes to something else.
    """
    if plan_hash is None:
        raise MedsegError("the version records no plan_hash: the plan it was trained with cannot be checked")
    plans = schemas.Plans.load(package_dir)
    found = plans.content_hash()
    if found != plan_hash:
        raise MedsegError(f"the registered package's plan hashes to {found}, the lineage says plan_hash {plan_hash}", package_dir / schemas.PLANS_JSON)
    return plans


def compare_training_params(client: Any, training_run_id: str | None, config: Mapping[str, Any]) -> list[str]:
    """Warnings where the training run logged another value than the package's config. Values the run fills in when it
    starts (logged as ``auto`` or empty: the network, the loss and their options follow the task) and machine settings
    are skipped: the package holds what they became. Empty when they agree; one warning when the run is not there."""
    if training_run_id is None:
        return ["the lineage names no training run: parameters taken from the registered package alone"]
    try:
        logged = dict(client.get_run(training_run_id).data.params)
    except Exception:  # noqa: BLE001 - another tracking store, or a deleted run: the package still holds the config
        return [f"training run {training_run_id} is not in this tracking store: parameters taken from the registered package alone"]
    out = []
    for key, value in config.items():
        seen = logged.get(key)
        if seen is None or seen in _FILLED_AT_START or key in MACHINE_PARAMS:
            continue
        if seen != str(value):
            out.append(f"training run {training_run_id} logged {key}={seen}, the registered package says {value}")
    return out


# --------------------------------------------------------------------------- 2. the code
def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MedsegError(f"git {args[0]} failed: {exc}", repo) from None
    if check and done.returncode != 0:
        raise MedsegError(f"git {' '.join(args[:2])} failed: {done.stderr.strip()[-500:]}", repo)
    return done


def git_root(start: Path | None = None) -> Path:
    """The git repository holding ``start`` (default: the current folder, else this source tree).

    Raises:
        MedsegError: not inside a git repository.
    """
    candidates = [Path(start)] if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for folder in candidates:
        done = _git(folder, "rev-parse", "--show-toplevel", check=False) if folder.is_dir() else None
        if done is not None and done.returncode == 0:
            return Path(done.stdout.strip())
    raise MedsegError("not inside a git repository (give --repo, a clone of medseg-ops)", candidates[0])


def resolve_commit(repo: Path, commit: str | None) -> str:
    """The full id of ``commit`` in ``repo``.

    Raises:
        MedsegError: no commit recorded, not a commit id, or a commit the repository does not hold.
    """
    if commit is None:
        raise MedsegError("the version records no git_commit: the code that trained it is unknown")
    if not _COMMIT_ID.match(commit):
        raise MedsegError(f"the recorded git_commit {commit!r} is not a commit id")
    done = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", check=False)
    if done.returncode != 0:
        raise MedsegError(f"commit {commit} is not in the repository: fetch it (e.g. `git fetch origin {commit}`) or rebuild in a clone that has it", repo)
    return done.stdout.strip()


@contextlib.contextmanager
def worktree(repo: Path, commit: str, where: Path) -> Iterator[Path]:
    """``commit`` checked out (detached) in a ``git worktree`` at ``where``; removed afterwards, also on failure."""
    _git(repo, "worktree", "add", "--detach", "--quiet", str(where), commit)
    try:
        yield where
    finally:
        _git(repo, "worktree", "remove", "--force", str(where), check=False)
        shutil.rmtree(where, ignore_errors=True)
        _git(repo, "worktree", "prune", check=False)


# --------------------------------------------------------------------------- 3. the data
@dataclass
class DataSource:
    """The dataset the rebuild uses: where, how it was found, and how many files were checked."""

    path: Path
    how: str
    manifest_hash: str
    files_checked: int


def verify_dataset(folder: Path, manifest_hash: str) -> int:
    """Check that ``folder`` is the dataset revision ``manifest_hash``: its manifest's hash, and every file it lists.

    Returns the number of files checked.

    Raises:
        MedsegError: no manifest, another revision, a manifest that does not match its own list, or files missing or
            changed (naming the first few).
    """
    folder = Path(folder)
    if not (folder / schemas.MANIFEST_JSON).is_file():
        raise MedsegError(f"no {schemas.MANIFEST_JSON}: not a dataset written by `medseg ingest`", folder)
    manifest = schemas.Manifest.load(folder)
    if manifest.content_hash != manifest_hash:
        raise MedsegError(f"manifest hash mismatch: this dataset is revision {manifest.content_hash or '(none)'}, the version was trained on {manifest_hash}",
                          folder / schemas.MANIFEST_JSON)
    if manifest.compute_hash() != manifest.content_hash:
        raise MedsegError("the manifest's content_hash does not match its own list of files (edited by hand?)", folder / schemas.MANIFEST_JSON)
    bad, n = [], 0
    for case in manifest.cases:
        for entry in case.get("files", []):
            n += 1
            path = folder / str(entry["path"])
            if not path.is_file():
                bad.append(f"{entry['path']} missing")
            elif sha256_file(path) != entry["sha256"]:
                bad.append(f"{entry['path']} changed")
    if bad:
        raise MedsegError(f"{len(bad)} of {n} file(s) differ from the manifest of revision {manifest_hash}: {', '.join(bad[:5])}"
                          + (", ..." if len(bad) > 5 else ""), folder)
    return n


@contextlib.contextmanager
def dvc_checkout(repo: Path, md5: str) -> Iterator[Path]:
    """The folder DVC knows by ``md5`` (a directory hash ``….dir``), materialised from DVC's cache, else pulled from the
    default remote (:func:`medseg.data.dvc_remote.pull`: S3 credentials from the environment). It lands in a temporary
    folder inside the repository (DVC's outputs must be inside it), removed afterwards.

    Raises:
        MedsegError: not a DVC repository, no remote, or the data neither in the cache nor on the remote.
    """
    from medseg.data import dvc_remote

    tmp = Path(tempfile.mkdtemp(prefix=".medseg-rebuild-data-", dir=repo))
    try:
        target, folder = tmp / "dataset.dvc", tmp / "dataset"
        # a .dvc file naming the recorded hash: what `dvc add` would have written for that folder (DVC 3 hashes)
        write_text(target, yaml.safe_dump({"outs": [{"md5": md5, "path": folder.name, "hash": "md5"}]}))
        if not _checkout_from_cache(repo, target):
            log.info("dataset %s is not in DVC's cache: pulling it from the remote", md5)
            dvc_remote.pull(repo, [target])
        if not folder.is_dir():
            raise MedsegError(f"DVC did not materialise the dataset {md5}", repo)
        yield folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkout_from_cache(repo: Path, target: Path) -> bool:
    """Materialise ``target``'s output from the local DVC cache alone; ``False`` when the cache lacks it."""
    from dvc.exceptions import DvcException

    from medseg.data import dvc_remote

    with dvc_remote.open_repo(repo) as r:
        try:
            r.checkout(targets=[str(target.absolute())])
        except DvcException:
            return False
    return (target.parent / "dataset").is_dir()


def locate_dataset(lineage: Mapping[str, str], given: Path | None, repo: Path, stack: contextlib.ExitStack) -> DataSource:
    """The dataset revision the version was trained on, verified (:func:`verify_dataset`).

    ``given`` (``--dataset``) must be it; otherwise the recorded ``dataset_path`` is used when it still holds it, else
    the recorded DVC md5 is checked out (kept until ``stack`` closes).

    Raises:
        MedsegError: no manifest hash recorded, the given folder is another revision, or the revision is nowhere.
    """
    expected = _known(lineage.get("manifest_hash"))
    if expected is None:
        raise MedsegError("the version records no manifest_hash: the data it was trained on cannot be identified")
    if given is not None:  # absolute: the stages run in the work folder
        given = Path(given).resolve()
        return DataSource(given, "given (--dataset)", expected, verify_dataset(given, expected))
    problems = []
    recorded = _known(lineage.get("dataset_path"))
    if recorded is not None and Path(recorded).is_dir():
        try:
            return DataSource(Path(recorded), "recorded dataset_path", expected, verify_dataset(Path(recorded), expected))
        except MedsegError as exc:
            problems.append(str(exc))
    else:
        problems.append(f"{recorded}: not there any more" if recorded else "no dataset_path recorded")
    md5 = _known(lineage.get("dataset_dvc_md5"))
    if md5 is not None:
        log.warning("the recorded dataset cannot be used (%s): checking out DVC's %s instead", "; ".join(problems), md5)
        folder = stack.enter_context(dvc_checkout(repo, md5))
        return DataSource(folder, f"DVC {md5}", expected, verify_dataset(folder, expected))
    raise MedsegError(f"the dataset revision {expected} is not available ({'; '.join(problems)}) and no DVC md5 is recorded: "
                      "pass --dataset DIR holding that revision")


# --------------------------------------------------------------------------- 4. train again with the commit's code
def run_medseg(source: Path, args: Sequence[str], cwd: Path, log_file: Path, commit: str) -> None:
    """``medseg ARGS`` of the worktree ``source`` with this Python, output to ``log_file``.

    Raises:
        MedsegError: the command failed (its last lines of output, and the log's path).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])]), "MEDSEG_GIT_COMMIT": commit,
           "PYTHONDONTWRITEBYTECODE": "1"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("rebuild: medseg %s (commit %s; log %s)", args[0], commit[:12], log_file)
    with open(log_file, "w", encoding="utf-8") as out:
        done = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(source) + os.sep, *map(str, args)], cwd=cwd, env=env, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-_TAIL_LINES:])
        raise MedsegError(f"`medseg {args[0]}` of commit {commit[:12]} failed (exit {done.returncode}):\n{tail}", log_file)


def commit_overlap(source: Path) -> float:
    """The evaluation overlap the commit's ``params.yaml`` gives the pipeline (``evaluate.overlap``), else 0.5."""
    path = source / schemas.PARAMS_YAML
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return float((params.get("evaluate") or {}).get("overlap", DEFAULT_OVERLAP))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return DEFAULT_OVERLAP


def retrain(source: Path, commit: str, dataset: Path, package_dir: Path, config: Mapping[str, Any], plan_hash: str, workdir: Path,
            overlap: float, mirror: bool = False) -> tuple[Path, schemas.Metrics]:
    """Preprocess ``dataset`` with the registered plan, train with ``config`` and evaluate the test split, all with the
    worktree's code. Returns the rebuilt package and its test metrics.

    Raises:
        MedsegError: a stage failed, or preprocessing at the commit changed the plan.
    """
    plans = schemas.Plans.load(package_dir)
    package = schemas.ModelPackage.load(package_dir)
    pre, train_dir, eval_dir, logs = workdir / "preprocessed", workdir / "train", workdir / "evaluation", workdir / "logs"
    trained = list(plans.trained_configurations or [package.configuration])
    # the registered plan itself (and the fingerprint beside it): the same plan, not a new planning of the same data
    run_medseg(source, ["preprocess", "--dataset", dataset, "--out", pre, "--device-budget", plans.device_budget,
                        "--plans", package_dir / schemas.PLANS_JSON, "--configurations", *trained], workdir, logs / "preprocess.txt", commit)
    found = schemas.Plans.load(pre).content_hash()
    if found != plan_hash:
        raise MedsegError(f"preprocessing at commit {commit[:12]} wrote a plan hashing to {found}, not the recorded {plan_hash}", pre / schemas.PLANS_JSON)
    params_file = workdir / schemas.PARAMS_YAML
    write_text(params_file, yaml.safe_dump({"train": dict(config)}, sort_keys=False))
    run_medseg(source, ["train", "--preprocessed", pre, "--params", params_file, "--out", train_dir, "--tracking-uri", "none"], workdir,
               logs / "train.txt", commit)
    model_dir = train_dir / "model"
    if not (model_dir / schemas.MODEL_PACKAGE_JSON).is_file():
        raise MedsegError("training finished without writing a model package", train_dir)
    run_medseg(source, ["evaluate-model", "--model", model_dir, "--dataset", dataset, "--out", eval_dir, "--overlap", repr(float(overlap)),
                        *(["--mirror"] if mirror else [])], workdir, logs / "evaluate.txt", commit)
    return model_dir, schemas.Metrics.load(eval_dir)


# --------------------------------------------------------------------------- 5. compare
@dataclass
class MetricRow:
    """One reported metric, registered against rebuilt; ``checked`` rows decide the outcome."""

    group: str
    metric: str
    registered: float | None
    rebuilt: float | None
    checked: bool
    diff: float | None = None
    within: bool = True

    def judge(self, tolerance: float) -> MetricRow:
        if self.registered is not None and self.rebuilt is not None:
            self.diff = self.rebuilt - self.registered
        # a tiny allowance for the float round trip through MLflow's store
        self.within = not self.checked or (self.diff is not None and abs(self.diff) <= tolerance + 1e-9)
        return self


def compare_metrics(registered: Mapping[str, float], rebuilt: schemas.Metrics, task: Task, tolerance: float) -> list[MetricRow]:
    """Every metric the task reports (the run's ``test_<GROUP>_<metric>``) against the rebuilt evaluation's; the task's
    primary metric of each group is checked against ``tolerance``, the others (e.g. distances in mm) are shown."""
    from medseg.registry.registry import _metric_key

    reported = task.reported_metrics(rebuilt.mean)
    names = {f"{g}_{m}": (g, m) for g, values in rebuilt.mean.items() for m in (values or {})}
    rows, seen = [], set()
    for key, value in reported.items():
        group, metric = names.get(key, ("", key))
        run_key = _metric_key(f"test_{key}")
        seen.add(run_key)
        rows.append(MetricRow(group, metric, _number(registered.get(run_key)), float(value), metric == task.primary_metric).judge(tolerance))
    for run_key, value in registered.items():  # registered, but not reported by the rebuilt evaluation
        key = run_key[len("test_"):]
        if run_key.startswith("test_") and run_key not in seen and key != "n_cases":
            rows.append(MetricRow("", key, _number(value), None, key.endswith(f"_{task.primary_metric}")).judge(tolerance))
    return rows


def _count(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def compare_weights(registered_dir: Path, rebuilt_dir: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two packages' state_dicts: ``bitwise_equal``, ``n_tensors``, ``n_different``,
    ``different`` (the first names), ``max_abs_diff`` and keys present on one side only."""
    import torch

    def load(folder: Path) -> dict[str, Any]:
        package = schemas.ModelPackage.load(folder)
        return torch.load(folder / package.weights_file, map_location="cpu", weights_only=True)

    a, b = load(registered_dir), load(rebuilt_dir)
    only = sorted(set(a) ^ set(b))
    different, max_abs = [], 0.0
    for key in [k for k in a if k in b]:
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            different.append(key)
            max_abs = math.inf
        elif not torch.equal(x, y):
            different.append(key)
            if x.is_floating_point():
                max_abs = max(max_abs, float((x.double() - y.double()).abs().max()))
    return {"bitwise_equal": not different and not only, "n_tensors": len(a), "n_different": len(different), "different": different[:5],
            "max_abs_diff": max_abs, "only_in_one": only[:5]}


# --------------------------------------------------------------------------- the whole rebuild
@dataclass
class RebuildResult:
    """What :func:`rebuild` found; ``reproduced`` decides the exit code."""

    name: str
    version: str
    commit: str
    lineage: dict[str, str]
    data: dict[str, Any]
    plan_hash: str
    params: dict[str, Any]
    overlap: float
    test_set: dict[str, Any]
    primary_metric: str
    tolerance: float
    metrics: list[dict[str, Any]]
    weights: dict[str, Any]
    reproduced: bool
    reason: str
    warnings: list[str] = field(default_factory=list)
    workdir: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild(name: str, version: str | int, tracking_uri: str, *, tolerance: float = DEFAULT_TOLERANCE, dataset: Path | None = None,
            repo: Path | None = None, workdir: Path | None = None, overlap: float | None = None, mirror: bool = False,
            require_bitwise: bool = False) -> RebuildResult:
    """Train version ``version`` of ``name`` again from its lineage and compare (see the module docstring).

    Args:
        tolerance: largest accepted absolute difference of the task's primary metric (Dice by default), per group.
        dataset: the dataset revision to use (checked against the manifest hash); default: as recorded.
        repo: the git repository holding the commit (default: the current folder's, else this source tree's).
        workdir: where to keep the rebuilt artefacts (an empty or new folder); default: a temporary folder, removed.
        overlap: evaluation sliding-window overlap; default: the commit's ``params.yaml`` ``evaluate.overlap``.
        mirror: mirroring test-time augmentation at evaluation (as the registered evaluation used it, if it did).
        require_bitwise: also count differing weights as not reproduced, when bitwise equality is expected.

    Raises:
        MedsegError: a refusal (unknown version, commit not in the repository, data of another revision or nowhere,
            plan mismatch, an ensemble or cascade) or a failed stage.
    """
    from medseg.registry.registry import _client, hash_test_set

    if not tolerance >= 0:
        raise MedsegError(f"--tolerance must be >= 0, got {tolerance}")
    t0 = time.monotonic()
    repo = git_root(repo)
    with contextlib.ExitStack() as stack:
        if workdir is not None:
            workdir = Path(workdir).resolve()
            if workdir.exists() and any(workdir.iterdir()):
                raise MedsegError("the work folder must be empty or new", workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            scratch = workdir
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medseg-rebuild-")))
        registered = read_version(name, str(version), tracking_uri, scratch / "registered")
        commit = resolve_commit(repo, registered.lineage("git_commit"))  # cheap refusals first
        config = training_config(registered.package_dir)
        plan_hash = check_plan(registered.package_dir, registered.lineage("plan_hash")).content_hash()
        warnings = compare_training_params(_client(tracking_uri), registered.lineage("training_run_id"), config)
        if registered.lineage("git_dirty") == "true":
            warnings.append(f"the version was registered from a tree with uncommitted changes: commit {commit[:12]} may not hold the code that trained it")
        data = locate_dataset(registered.tags, dataset, repo, stack)
        log.info("rebuild: data %s (%s, %d files verified), commit %s", data.path, data.how, data.files_checked, commit[:12])
        source = stack.enter_context(worktree(repo, commit, scratch / "source"))
        overlap = commit_overlap(source) if overlap is None else float(overlap)
        model_dir, metrics = retrain(source, commit, data.path, registered.package_dir, config, plan_hash, scratch, overlap, mirror)
        task = Task.from_folder(registered.package_dir)
        weights = compare_weights(registered.package_dir, model_dir)
        devices = {str(schemas.ModelPackage.load(folder).training.get("device", "")) for folder in (registered.package_dir, model_dir)}
        weights["bitwise_expected"] = bool(config.get("deterministic")) and devices == {"cpu"}
        test_set = {"registered": registered.tags.get("test_set_hash", UNKNOWN), "rebuilt": hash_test_set(metrics.per_case),
                    "registered_cases": _count(registered.metrics.get("test_n_cases")), "rebuilt_cases": metrics.n_cases}
        test_set["same"] = test_set["registered"] != UNKNOWN and test_set["registered"] == test_set["rebuilt"]
        rows = compare_metrics(registered.metrics, metrics, task, tolerance)
        data_info = {"path": str(data.path), "how": data.how, "manifest_hash": data.manifest_hash, "files_checked": data.files_checked}

    reproduced, reason = _verdict(rows, test_set, weights, task.primary_metric, tolerance, require_bitwise)
    lineage = {key: registered.tags.get(key, UNKNOWN) for key in LINEAGE_KEYS}
    return RebuildResult(name=registered.name, version=registered.version, commit=commit, lineage=lineage, data=data_info, plan_hash=plan_hash, params=config,
                         overlap=overlap, test_set=test_set, primary_metric=task.primary_metric, tolerance=float(tolerance),
                         metrics=[asdict(r) for r in rows], weights=weights, reproduced=reproduced, reason=reason, warnings=warnings,
                         workdir=str(workdir) if workdir is not None else None, seconds=round(time.monotonic() - t0, 1))


def _verdict(rows: list[MetricRow], test_set: Mapping[str, Any], weights: Mapping[str, Any], primary: str, tolerance: float,
             require_bitwise: bool) -> tuple[bool, str]:
    """(reproduced, why) from the compared test set, metrics and weights."""
    if not test_set["same"]:
        return False, (f"the rebuilt evaluation ran on another test set ({test_set['rebuilt_cases']} cases, hash {str(test_set['rebuilt'])[:12]}) "
                       f"than the registered one ({test_set['registered_cases']} cases, hash {str(test_set['registered'])[:12]})")
    checked = [r for r in rows if r.checked]
    if not checked:
        return False, f"no {primary} was registered and rebuilt to compare"
    off = [r for r in checked if not r.within]
    if off:
        return False, f"{len(off)} of {len(checked)} {primary} value(s) differ by more than {tolerance:g}: " + ", ".join(
            f"{r.group or '?'} {_fmt(r.registered)} → {_fmt(r.rebuilt)}" for r in off)
    if require_bitwise and weights.get("bitwise_expected") and not weights.get("bitwise_equal"):
        return False, f"{weights['n_different']} of {weights['n_tensors']} weight tensors differ although the run is deterministic on CPU"
    worst = max(abs(r.diff or 0.0) for r in checked)
    return True, f"every {primary} within {tolerance:g} of the registered value (largest difference {worst:.2g})"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- CLI (wired in medseg.registry.registry)
def add_rebuild_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``medseg registry rebuild NAME --version V [--tolerance T] ...``."""
    p = sub.add_parser("rebuild", parents=[common], help="train a registered version again from its lineage and compare it with the registered one",
                       description="Train a registered version again from its lineage (the data revision, checked against the manifest hash; the "
                                   "git commit, in a temporary worktree; the registered plan and parameters), evaluate it on the same test cases, "
                                   "and compare metrics and weights. Exit 0 when every group's primary metric is within the tolerance, 1 when not, "
                                   "2 on a refusal.")
    p.add_argument("name")
    p.add_argument("--version", required=True, help="the registered version to rebuild")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest accepted difference of the task's primary metric per group, in its units (default {DEFAULT_TOLERANCE}: Dice)")
    p.add_argument("--dataset", type=Path, default=None, help="the dataset revision to use (default: the recorded dataset_path, else DVC's recorded md5); "
                                                              "checked against the manifest hash either way")
    p.add_argument("--repo", type=Path, default=None, help="git repository holding the commit (default: the current folder's)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the rebuilt package, metrics and logs here (default: a temporary folder, removed)")
    p.add_argument("--overlap", type=float, default=None, help="evaluation overlap (default: the commit's params.yaml evaluate.overlap, else 0.5)")
    p.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation at evaluation (if the registered evaluation used it)")
    p.add_argument("--require-bitwise", action="store_true", help="also fail when a deterministic CPU run does not give bitwise equal weights")


def run_rebuild(args: argparse.Namespace, tracking_uri: str, out: TextIO | None = None) -> int:
    """``medseg registry rebuild``: prints the comparison; 0 when reproduced, 1 when not."""
    out = out or sys.stdout
    result = rebuild(args.name, args.version, tracking_uri, tolerance=args.tolerance, dataset=args.dataset, repo=args.repo, workdir=args.workdir,
                     overlap=args.overlap, mirror=args.mirror, require_bitwise=args.require_bitwise)
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2, default=str), file=out)
    else:
        print_result(result, out)
    return 0 if result.reproduced else 1


def print_result(r: RebuildResult, out: TextIO) -> None:
    """The comparison for people: what was used, one line per metric, the weights, the verdict."""
    print(f"rebuild of {r.name} v{r.version} at commit {r.commit[:12]} ({r.seconds:.0f} s)", file=out)
    print(f"  lineage: pipeline run {r.lineage.get('pipeline_run_id')}, training run {r.lineage.get('training_run_id')}, "
          f"medseg {r.lineage.get('medseg_version')}", file=out)
    print(f"  data: {r.data['path']} ({r.data['how']}; manifest {r.data['manifest_hash'][:12]}, {r.data['files_checked']} files verified)", file=out)
    print(f"  plan: {r.plan_hash[:12]} (checked); params: {r.params.get('epochs')} epochs × {r.params.get('iterations_per_epoch')} iterations, "
          f"seed {r.params.get('seed')}, deterministic {str(bool(r.params.get('deterministic'))).lower()}; evaluation overlap {r.overlap:g}", file=out)
    t = r.test_set
    print(f"  test set: {t['rebuilt_cases']} case(s), " + ("the registered one" if t["same"] else f"NOT the registered one ({t['registered_cases']} cases)"), file=out)
    print(f"  {'group':<8} {'metric':<22} {'registered':>10} {'rebuilt':>10} {'diff':>9}", file=out)
    for m in r.metrics:
        diff = "" if m["diff"] is None else f"{m['diff']:+.4f}"
        mark = ("ok" if m["within"] else f"OFF (> {r.tolerance:g})") if m["checked"] else ""
        print(f"  {m['group']:<8} {m['metric']:<22} {_fmt(m['registered']):>10} {_fmt(m['rebuilt']):>10} {diff:>9}  {mark}".rstrip(), file=out)
    w = r.weights
    if w.get("bitwise_equal"):
        state = f"bitwise equal ({w['n_tensors']} tensors)"
    else:
        state = f"{w['n_different']} of {w['n_tensors']} tensors differ (max |diff| {w['max_abs_diff']:.3g})" + (
            f", only on one side: {', '.join(w['only_in_one'])}" if w.get("only_in_one") else "")
    expected = "expected: deterministic on CPU" if w.get("bitwise_expected") else "not expected: not a deterministic CPU run"
    print(f"  weights: {state} ({expected})", file=out)
    for warning in r.warnings:
        print(f"  warning: {warning}", file=out)
    print(f"{'reproduced' if r.reproduced else 'NOT reproduced'}: {r.reason}", file=out)
    if r.workdir:
        print(f"  artefacts kept in {r.workdir}", file=out)


__all__ = ["DEFAULT_TOLERANCE", "DataSource", "MetricRow", "RebuildResult", "RegisteredVersion", "add_rebuild_parser", "check_plan", "compare_metrics",
           "compare_training_params", "compare_weights", "dvc_checkout", "git_root", "locate_dataset", "read_version", "rebuild", "resolve_commit",
           "retrain", "run_medseg", "run_rebuild", "training_config", "verify_dataset", "worktree"]
