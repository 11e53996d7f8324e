"""Users and permissions of an MLflow server running the basic-auth app (``mlflow server --app-name basic-auth``).

Run as the server's admin (the account MLflow bootstraps from ``MLFLOW_AUTH_ADMIN_USERNAME`` /
``MLFLOW_AUTH_ADMIN_PASSWORD`` on its first start), through MLflow's own auth REST API. Idempotent: a
user that exists gets its password (re)set (rotating a Secret and re-running is enough), a grant that
exists with another level is replaced, nothing else is touched.

Two identities (``k8s/base/mlflow-users-job.yaml`` runs this in the cluster):

- **pipeline**: ``MANAGE`` on the registered models and experiments it writes: register versions, move
  the ``champion`` / ``challenger`` aliases, log runs and artefacts;
- **predictor**: ``READ`` on the registered models (resolve an alias, download a version) and on the
  experiments holding their artefacts. It cannot register, move an alias or write.

With the server's ``default_permission = NO_PERMISSIONS`` a user sees nothing it was not granted.

Command line (credentials from the environment, never arguments)::

    MLFLOW_TRACKING_URI=http://mlflow:5000 MLFLOW_ADMIN_USERNAME=... MLFLOW_ADMIN_PASSWORD=... \\
    MLFLOW_PIPELINE_USERNAME=... MLFLOW_PIPELINE_PASSWORD=... \\
    MLFLOW_PREDICTOR_USERNAME=... MLFLOW_PREDICTOR_PASSWORD=... \\
    python -m medseg.registry.auth_setup --model brats-segmentation --experiment medseg
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

from medseg.errors import MedsegError

log = logging.getLogger(__name__)

USERS_GET = "/api/2.0/mlflow/users/get"
USERS_CREATE = "/api/2.0/mlflow/users/create"
USERS_UPDATE_PASSWORD = "/api/2.0/mlflow/users/update-password"
PERMISSIONS_LIST = "/api/3.0/mlflow/users/permissions/list"
PERMISSIONS_GRANT = "/api/3.0/mlflow/users/permissions/grant"
PERMISSIONS_REVOKE = "/api/3.0/mlflow/users/permissions/revoke"
EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
EXPERIMENT_CREATE = "/api/2.0/mlflow/experiments/create"
MIN_PASSWORD_LENGTH = 12   # MLflow's basic-auth app refuses shorter passwords


@dataclasses.dataclass(frozen=True)
class Grant:
    resource_type: str   # "registered_model" or "experiment"
    resource_id: str     # model name, or experiment name (resolved to its id here)
    permission: str      # READ, EDIT, MANAGE, NO_PERMISSIONS


@dataclasses.dataclass(frozen=True)
class UserSpec:
    username: str
    password: str = dataclasses.field(repr=False)
    grants: tuple[Grant, ...] = ()


def pipeline_grants(models: list[str], experiments: list[str]) -> tuple[Grant, ...]:
    """The pipeline's identity: MANAGE on its models (versions, aliases) and experiments (runs, artefacts)."""
    return tuple(Grant("registered_model", m, "MANAGE") for m in models) + tuple(Grant("experiment", e, "MANAGE") for e in experiments)


def predictor_grants(models: list[str], experiments: list[str]) -> tuple[Grant, ...]:
    """The predictor's identity: READ on the models and on the experiments whose artefacts hold their versions."""
    return tuple(Grant("registered_model", m, "READ") for m in models) + tuple(Grant("experiment", e, "READ") for e in experiments)


class AuthAdmin:
    """A few calls of MLflow's auth REST API, as the admin user (HTTP basic auth)."""

    def __init__(self, tracking_uri: str, username: str, password: str, timeout_s: float = 30.0):
        import requests

        self.base = tracking_uri.rstrip("/")
        self.session = requests.Session()
        self.session.auth = (username, password)
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> tuple[int, dict[str, Any]]:
        resp = self.session.request(method, self.base + path, timeout=self.timeout_s, **kwargs)
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {"message": resp.text[:300]}
        if resp.status_code == 401:
            raise MedsegError(f"MLflow at {self.base} refused the admin credentials (401): check the admin Secret")
        if resp.status_code not in ok:
            raise MedsegError(f"MLflow {method} {path} answered {resp.status_code}: {body.get('error_code', '')} {body.get('message', '')}".strip())
        return resp.status_code, body

    def wait_until_up(self, timeout_s: float = 600.0, poll_s: float = 5.0) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.session.get(self.base + "/health", timeout=10).status_code == 200:
                    return
                last = "not healthy yet"
            except requests.RequestException as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise MedsegError(f"MLflow at {self.base} did not answer /health in {timeout_s:.0f} s ({last})")
            log.info("waiting for MLflow at %s: %s", self.base, last)
            time.sleep(poll_s)

    def ensure_user(self, username: str, password: str) -> str:
        """Create ``username``, or reset its password if it exists. Returns ``created`` or ``updated``."""
        if len(password) < MIN_PASSWORD_LENGTH:
            raise MedsegError(f"the password of MLflow user {username!r} is shorter than {MIN_PASSWORD_LENGTH} characters")
        status, _ = self._call("GET", USERS_GET, ok=(200, 404), params={"username": username})
        if status == 404:
            self._call("POST", USERS_CREATE, json={"username": username, "password": password})
            return "created"
        self._call("PATCH", USERS_UPDATE_PASSWORD, json={"username": username, "password": password})
        return "updated"

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (by the admin) when missing."""
        status, body = self._call("GET", EXPERIMENT_BY_NAME, ok=(200, 404), params={"experiment_name": name})
        if status == 200:
            return str(body["experiment"]["experiment_id"])
        status, body = self._call("POST", EXPERIMENT_CREATE, ok=(200, 400), json={"name": name})
        if status == 200:
            return str(body["experiment_id"])
        return str(self._call("GET", EXPERIMENT_BY_NAME, params={"experiment_name": name})[1]["experiment"]["experiment_id"])  # lost a race

    def grants_of(self, username: str) -> dict[tuple[str, str], str]:
        """``(resource_type, resource_id) -> permission`` of the user's own (per-user) grants."""
        _, body = self._call("GET", PERMISSIONS_LIST, params={"username": username})
        out = {}
        for row in body.get("permissions", []):
            rtype = row.get("resource_type")
            rid = row.get("resource_pattern", row.get("resource_id"))
            if rtype and rid is not None:
                out[(str(rtype), str(rid))] = str(row.get("permission"))
        return out

    def ensure_grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> str:
        """Grant ``permission``; a different existing level is replaced. Returns ``granted``, ``kept`` or ``changed``."""
        current = self.grants_of(username).get((resource_type, resource_id))
        if current == permission:
            return "kept"
        body = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        if current is not None:
            self._call("POST", PERMISSIONS_REVOKE, json=body)
        self._call("POST", PERMISSIONS_GRANT, json={**body, "permission": permission})
        return "granted" if current is None else "changed"


def setup_users(tracking_uri: str, admin_username: str, admin_password: str, users: list[UserSpec], wait_s: float = 0.0) -> dict[str, Any]:
    """Create/update ``users`` and their grants on the MLflow server at ``tracking_uri``; a JSON-able summary."""
    admin = AuthAdmin(tracking_uri, admin_username, admin_password)
    if wait_s > 0:
        admin.wait_until_up(wait_s)
    summary: dict[str, Any] = {}
    experiment_ids: dict[str, str] = {}
    for user in users:
        if user.username == admin_username:
            raise MedsegError(f"user {user.username!r} is the admin: give the workloads their own accounts")
        entry: dict[str, Any] = {"user": admin.ensure_user(user.username, user.password), "grants": {}}
        for grant in user.grants:
            rid = grant.resource_id
            if grant.resource_type == "experiment":
                rid = experiment_ids.setdefault(rid, admin.experiment_id(rid))
            entry["grants"][f"{grant.resource_type}:{grant.resource_id}={grant.permission}"] = admin.ensure_grant(user.username, grant.resource_type, rid, grant.permission)
        summary[user.username] = entry
        log.info("MLflow user %s: %s", user.username, entry)
    return summary


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise MedsegError(f"environment variable {name} is not set (it comes from a Secret: see k8s/README.md)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.registry.auth_setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="MLflow server URL (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--model", action="append", default=[], help="registered model the identities get access to (repeatable)")
    parser.add_argument("--experiment", action="append", default=[], help="experiment (by name) the identities get access to (repeatable)")
    parser.add_argument("--wait-s", type=float, default=600.0, help="wait this long for the server's /health (default 600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.tracking_uri:
            raise MedsegError("no MLflow URL: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        if not args.model:
            raise MedsegError("no registered model named: pass --model at least once")
        users = [UserSpec(_env("MLFLOW_PIPELINE_USERNAME"), _env("MLFLOW_PIPELINE_PASSWORD"), pipeline_grants(args.model, args.experiment)),
                 UserSpec(_env("MLFLOW_PREDICTOR_USERNAME"), _env("MLFLOW_PREDICTOR_PASSWORD"), predictor_grants(args.model, args.experiment))]
        summary = setup_users(args.tracking_uri, _env("MLFLOW_ADMIN_USERNAME"), _env("MLFLOW_ADMIN_PASSWORD"), users, wait_s=args.wait_s)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
