"""Model versions while serving: load a version beside the one serving, swap atomically, poll the alias.

A :class:`ServedVersion` bundles everything one version needs (predictor, channels, drift reference, model card). The
model keeps one reference to the current bundle; each request reads it once when it starts and uses that
bundle to the end, so a swap (a single attribute assignment) never mixes versions inside a request and
in-flight requests finish on the version they started with. The old bundle is freed when its last request
is done; its downloaded files are removed at the swap (the weights are in memory by then).

Reload triggers:

- :class:`AliasPoller`: for ``models:/NAME@ALIAS``, every ``reload_interval_s`` seconds one registry lookup;
  when the alias points to another version, ``model.load()`` loads it and swaps.
- the model repository's ``load(name)`` (:func:`make_repository`): ``model.load()`` in a worker thread — a
  no-op when the version has not moved (for a package folder: always re-read). In-process callers only: the
  server refuses KServe's repository routes (REST 403, gRPC PERMISSION_DENIED, see :mod:`medseg.serving.guard`),
  so nobody on the data plane can unload the model or switch versions.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.inference.predictor import Predictor
from medseg.registry.resolve import MODELS_URI_PREFIX, parse_models_uri, registered_version, resolve_model_source
from medseg.schemas import MODEL_CARD_MD
from medseg.serving import import_kserve
from medseg.serving.client import MODEL_CARD_PARAMETER
from medseg.serving.contract import Contract
from medseg.serving.drift import DriftReference, load_drift_reference
from medseg.serving.metrics import MODEL_INFO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersion:
    """One loaded model version. ``target_spacing``: the spacing (mm) the model resamples to; ``contract``: what its
    endpoint takes and answers (from its task and network)."""

    predictor: Predictor
    version: str
    package_dir: Path
    channels: list[str]
    regions: list[str]
    target_spacing: list[float]
    drift: DriftReference | None
    download_root: Path | None  # a temporary folder of ours, removed when the version is retired
    contract: Contract
    card: str = ""  # the version's model card (Markdown), "" when it has none

    def metadata(self, model_name: str) -> dict[str, Any]:
        """``GET /v2/models/NAME``'s answer for this version; the model card, when there is one, as the model-level
        parameter ``model_card`` (Markdown text: the viewer shows it)."""
        meta = self.contract.metadata(model_name, self.version)
        if self.card:
            meta["parameters"][MODEL_CARD_PARAMETER] = self.card
        return meta


def load_served_version(model_uri: str, device: str, download_dir: str | Path | None, backend: str | None = None) -> ServedVersion:
    """Resolve ``model_uri`` (package folder or ``models:/...``), download if registered, build the predictor (``backend``:
    torch, onnx or auto, see :meth:`~medseg.inference.predictor.Predictor.from_package`)."""
    root: Path | None = None
    if model_uri.startswith(MODELS_URI_PREFIX):
        if download_dir is not None:
            Path(download_dir).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="medseg-serve-", dir=download_dir))  # one folder per load: versions never mix
    try:
        package_dir, version = resolve_model_source(model_uri, root)
        predictor = Predictor.from_package(package_dir, device=device, backend=backend)
        contract = Contract.of(predictor)
        drift = load_drift_reference(package_dir, predictor.channels)
        card = version_card(model_uri, version, package_dir)
    except BaseException:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return ServedVersion(predictor=predictor, version=version, package_dir=package_dir, channels=predictor.channels,
                         regions=predictor.region_names, target_spacing=[float(s) for s in predictor.config.spacing],
                         drift=drift, download_root=root, contract=contract, card=card)


def version_card(model_uri: str, version: str, package_dir: Path) -> str:
    """The model card of what is served: a registered version's ``model_card.md`` from its run (written at registration and
    promotion, :mod:`medseg.registry.model_card`), a package folder's own ``model_card.md`` if it has one, else ""."""
    if model_uri.startswith(MODELS_URI_PREFIX):
        from medseg.registry.model_card import registered_card_text

        name, _, _ = parse_models_uri(model_uri)
        return registered_card_text(name, version) or ""
    local = Path(package_dir) / MODEL_CARD_MD
    return local.read_text(encoding="utf-8") if local.is_file() else ""


def needs_reload(model_uri: str, current: ServedVersion | None) -> bool:
    """True when nothing is loaded, for a package folder (always re-read), or when the registry now points elsewhere."""
    if current is None or not model_uri.startswith(MODELS_URI_PREFIX):
        return True
    return registered_version(model_uri) != current.version


def publish_version(model_name: str, served: ServedVersion) -> None:
    """Export the version serving now as ``medseg_model_info`` and log it."""
    MODEL_INFO.labels(model=model_name).info({"version": served.version, "configuration": served.predictor.package.configuration,
                                              "drift_reference": served.drift.statistic if served.drift else "none",
                                              "backend": served.predictor.backend})
    log.info("model %s version %s serving from %s (%s; channels %s; drift reference: %s; backend: %s)", model_name, served.version, served.package_dir,
             served.predictor.task, ",".join(served.channels), f"{served.drift.statistic} from {served.drift.source}" if served.drift else "none",
             served.predictor.backend)


def retire(served: ServedVersion | None) -> None:
    """Remove a replaced version's downloaded files (requests still running on it have its weights in memory)."""
    if served is not None and served.download_root is not None:
        shutil.rmtree(served.download_root, ignore_errors=True)


def is_alias_uri(model_uri: str) -> bool:
    if not model_uri.startswith(MODELS_URI_PREFIX):
        return False
    try:
        return parse_models_uri(model_uri)[1] is not None
    except MedsegError:
        return False


class AliasPoller:
    """Every ``interval_s`` seconds, ``model.load()`` if ``models:/NAME@ALIAS`` points to another version.

    Errors (registry unreachable, a broken new version) are logged; the version serving stays.
    """

    def __init__(self, model: Any, interval_s: float):
        self.model = model
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"medseg-reload-{model.name}", daemon=True)

    def start(self) -> AliasPoller:
        self._thread.start()
        log.info("polling %s every %.0f s for a new version", self.model.model_uri, self.interval_s)
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if needs_reload(self.model.model_uri, self.model.served):
                    self.model.load()
            except Exception as exc:  # keep polling; the current version keeps serving
                log.warning("reload of %s failed, version %s keeps serving: %s", self.model.model_uri,
                            getattr(self.model.served, "version", "?"), exc)


def ensure_poller(model: Any, interval_s: float) -> AliasPoller | None:
    """The model's running poller, started if its URI is an alias and ``interval_s`` > 0; else None."""
    poller: AliasPoller | None = getattr(model, "poller", None)
    if poller is not None and poller.running:
        return poller
    if interval_s <= 0 or not is_alias_uri(model.model_uri):
        return None
    return AliasPoller(model, interval_s).start()


def stop_poller(model: Any) -> None:
    poller: AliasPoller | None = getattr(model, "poller", None)
    if poller is not None:
        poller.stop()


def make_repository() -> Any:
    """A ``kserve.model_repository.ModelRepository`` whose ``load(name)`` (``POST /v2/repository/models/NAME/load``)
    reloads the model (also after an unload), and whose ``unload`` stops the model's alias poller."""
    import_kserve()
    from kserve.errors import ModelNotFound
    from kserve.model_repository import ModelRepository

    class ReloadingRepository(ModelRepository):
        def __init__(self) -> None:
            super().__init__()
            self.known: dict[str, Any] = {}

        def update(self, model: Any, name: str | None = None) -> None:
            super().update(model, name)
            self.known[name or model.name] = model

        async def load(self, name: str) -> bool:  # type: ignore[override]
            model = self.known.get(name)
            if model is None:
                raise ModelNotFound(name)
            await asyncio.to_thread(model.load)
            self.update(model, name)  # registered again after an unload
            return bool(model.ready)

        def unload(self, name: str) -> None:
            model = self.models.get(name)
            super().unload(name)
            if model is not None:
                stop_poller(model)

    return ReloadingRepository()
