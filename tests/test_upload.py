"""`medseg pipeline upload` against a local fake of the Kubeflow Pipelines REST API: only the HTTP shape
(which endpoints, in which order, with what) is checked; the compiled YAML itself is tested elsewhere."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from medseg.errors import MedsegError


class FakeKfp:
    """Just enough of /apis/v2beta1 to create pipelines, versions, experiments and runs; records requests."""

    def __init__(self):
        self.requests: list[dict] = []
        self.pipelines: dict[str, str] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlparse(self.path)
                fake.requests.append({"method": "GET", "path": url.path, "query": parse_qs(url.query)})
                if url.path == "/apis/v2beta1/pipelines":
                    wanted = json.loads(parse_qs(url.query)["filter"][0])["predicates"][0]["stringValue"]
                    hits = [{"pipeline_id": pid, "display_name": n} for n, pid in fake.pipelines.items() if n == wanted]
                    return self._reply({"pipelines": hits, "total_size": len(hits)})
                if url.path.startswith("/apis/v2beta1/pipelines/") and url.path.endswith("/versions"):
                    return self._reply({"pipeline_versions": [{"pipeline_version_id": "v-first", "display_name": "first"}]})
                return self._reply({})

            def do_POST(self):
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append({"method": "POST", "path": url.path, "query": parse_qs(url.query), "body": body, "content_type": self.headers.get("Content-Type", "")})
                if url.path == "/apis/v2beta1/pipelines/upload":
                    name = parse_qs(url.query)["name"][0]
                    fake.pipelines[name] = f"p-{len(fake.pipelines) + 1}"
                    return self._reply({"pipeline_id": fake.pipelines[name], "display_name": name})
                if url.path == "/apis/v2beta1/pipelines/upload_version":
                    return self._reply({"pipeline_id": parse_qs(url.query)["pipelineid"][0], "pipeline_version_id": "v-2", "display_name": parse_qs(url.query)["name"][0]})
                if url.path == "/apis/v2beta1/experiments":
                    return self._reply({"experiment_id": "e-1", "display_name": json.loads(body)["display_name"]})
                if url.path == "/apis/v2beta1/runs":
                    return self._reply({"run_id": "r-1", "display_name": json.loads(body)["display_name"]})
                return self._reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self):
        return [r for r in self.requests if r["method"] == "POST"]


@pytest.fixture()
def fake_kfp():
    fake = FakeKfp()
    yield fake
    fake.server.shutdown()


def test_first_upload_creates_the_pipeline_then_versions(fake_kfp, tmp_path):
    from medseg.pipeline.runner import compile_pipeline
    from medseg.pipeline.upload import upload

    package = compile_pipeline(tmp_path)
    first = upload(fake_kfp.url, package=package)
    assert first["created"] is True and first["pipeline"] == "medseg-training" and first["version_id"] == "v-first"
    create = fake_kfp.posts()[0]
    assert create["path"] == "/apis/v2beta1/pipelines/upload" and create["query"]["name"] == ["medseg-training"]
    assert create["content_type"].startswith("multipart/form-data") and package.read_bytes()[:200] in create["body"]

    second = upload(fake_kfp.url, package=package, run=True, arguments={"source": "/data/brats"})
    assert second["created"] is False and second["version_id"] == "v-2" and second["run_id"] == "r-1"
    version, experiment, run = fake_kfp.posts()[1:]
    assert version["path"] == "/apis/v2beta1/pipelines/upload_version"
    assert version["query"]["pipelineid"] == [first["pipeline_id"]] and version["query"]["name"] == [package.stem]
    assert experiment["path"] == "/apis/v2beta1/experiments" and json.loads(experiment["body"])["display_name"] == "medseg"
    run_body = json.loads(run["body"])
    assert run_body["pipeline_version_reference"] == {"pipeline_id": first["pipeline_id"], "pipeline_version_id": "v-2"}
    assert run_body["runtime_config"]["parameters"] == {"source": "/data/brats"}


def test_unreachable_host_is_a_clear_error(tmp_path):
    from medseg.pipeline.runner import compile_pipeline
    from medseg.pipeline.upload import upload

    with pytest.raises(MedsegError, match="127.0.0.1:9"):
        upload("http://127.0.0.1:9", package=compile_pipeline(tmp_path))
