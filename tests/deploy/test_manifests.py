"""The deployment files of docs/deploy.md: the KubeRay manifests pass ``kubectl apply
--dry-run=client`` (against a discovery-only API server on 127.0.0.1 that knows core v1 and
KubeRay's ``ray.io/v1``; kubectl's client dry run needs one to map kinds), and every Serve config
(``deploy/serve.yaml``, the RayService's ``serveConfigV2``) is a valid Ray Serve config whose
flags ``truffula cluster`` accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

CORE = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [
        {"name": n, "singularName": s, "namespaced": True, "kind": k, "verbs": ["get", "create"]}
        for n, s, k in [
            ("persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim"),
            ("services", "service", "Service"),
            ("configmaps", "configmap", "ConfigMap"),
        ]
    ],
}
RAY = {
    "kind": "APIResourceList",
    "groupVersion": "ray.io/v1",
    "resources": [
        {"name": n, "singularName": s, "namespaced": True, "kind": k, "verbs": ["get", "create"]}
        for n, s, k in [
            ("rayservices", "rayservice", "RayService"),
            ("rayclusters", "raycluster", "RayCluster"),
        ]
    ],
}
GROUPS = {
    "kind": "APIGroupList",
    "apiVersion": "v1",
    "groups": [
        {
            "name": "ray.io",
            "versions": [{"groupVersion": "ray.io/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "ray.io/v1", "version": "v1"},
        }
    ],
}
PATHS: dict[str, Any] = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/api/v1": CORE,
    "/apis": GROUPS,
    "/apis/ray.io/v1": RAY,
}


class Discovery(BaseHTTPRequestHandler):
    """Answers discovery; every object is absent (404), so an apply is a create."""

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        body = PATHS.get(path)
        status = 200
        if body is None:
            status = 404
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
            body["reason"] = "NotFound"
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kuberay_manifests_apply(api_server: str, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    common = ["--kubeconfig", str(kubeconfig), "--server", api_server, "--validate=false"]
    r = kubectl("apply", "--dry-run=client", *common, "-k", "deploy/kuberay")
    assert r.returncode == 0, r.stderr
    assert "rayservice.ray.io/truffula created (dry run)" in r.stdout
    assert "persistentvolumeclaim/truffula-adapters created (dry run)" in r.stdout
    for f in ("adapters-pvc.yaml", "rayservice.yaml"):
        r = kubectl("apply", "--dry-run=client", *common, "-f", f"deploy/kuberay/{f}")
        assert r.returncode == 0 and "created (dry run)" in r.stdout, r.stderr


def serve_configs() -> list[dict[str, Any]]:
    (service,) = yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    return [
        yaml.safe_load((DEPLOY / "serve.yaml").read_text()),
        yaml.safe_load(service["spec"]["serveConfigV2"]),
    ]


@pytest.mark.parametrize("config", serve_configs(), ids=["serve.yaml", "rayservice"])
def test_serve_configs_are_valid(config: dict[str, Any]) -> None:
    pytest.importorskip("ray.serve")
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "truffula.cli.cluster:application"
    from truffula.cli.cluster import application

    built = application(app.args)
    assert isinstance(built, Application)
