"""``truffula cluster`` without Ray running: the adapter key a request is routed by, the
replicas' scale, the flags, and the message when Ray is not installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from truffula.cli import build_parser
from truffula.cluster.routing import adapter_of

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
def test_lorax_routes_route_by_adapter_id(path: str) -> None:
    b = body({"inputs": "hi", "parameters": {"adapter_id": "pirate", "max_new_tokens": 3}})
    assert adapter_of(path, b, BASE) == "pirate"
    assert adapter_of(path, body({"inputs": "hi"}), BASE) is None
    assert adapter_of(path, body({"inputs": "hi", "parameters": {"adapter_id": ""}}), BASE) is None
    assert (
        adapter_of(path, body({"inputs": "hi", "parameters": {"adapter_id": BASE}}), BASE) is None
    )


def test_merges_route_by_their_sorted_ids() -> None:
    one = body({"inputs": "x", "parameters": {"merged_adapters": {"ids": ["b", "a"]}}})
    two = body({"inputs": "x", "parameters": {"merged_adapters": {"ids": ["a", "b"]}}})
    assert adapter_of("/generate", one, BASE) == adapter_of("/generate", two, BASE) == "merge:a,b"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_openai_routes_route_by_model(path: str) -> None:
    assert adapter_of(path, body({"model": "caps", "prompt": "x"}), BASE) == "caps"
    assert adapter_of(path, body({"model": BASE, "prompt": "x"}), BASE) is None
    assert adapter_of(path, body({"prompt": "x"}), BASE) is None


@pytest.mark.parametrize(
    "raw", [b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", body({"parameters": "x"})]
)
def test_bodies_the_replica_rejects_have_no_key(raw: bytes) -> None:
    assert adapter_of("/generate", raw, BASE) is None
    assert adapter_of("/v1/completions", raw, BASE) is None


def test_other_routes_have_no_key() -> None:
    b = body({"model": "caps", "parameters": {"adapter_id": "pirate"}})
    for path in ("/tokenize", "/adapters/load", "/health", "/v1/models", "/metrics"):
        assert adapter_of(path, b, BASE) is None


def test_cluster_takes_every_serve_flag_and_its_own() -> None:
    parser = build_parser()
    serve_args = vars(parser.parse_args(["serve"]))
    cluster_args = vars(parser.parse_args(["cluster", "--replicas", "3", "--port", "9000"]))
    missing = set(serve_args) - set(cluster_args)
    assert not missing, missing
    assert cluster_args["replicas"] == 3 and cluster_args["port"] == 9000
    assert cluster_args["command"] == "cluster" and cluster_args["func"] is not serve_args["func"]


def test_scale_options() -> None:
    pytest.importorskip("ray.serve")
    from truffula.cluster.app import Scale

    fixed = Scale(replicas=2).options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    auto = Scale(replicas=1, min_replicas=1, max_replicas=4).options()["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 4 and auto["initial_replicas"] == 1
    # Serve takes both as deployment options (an unknown or mistyped key fails here)
    from ray import serve

    class Probe:
        pass

    scaled = serve.deployment(name="probe", **Scale(1, 1, 4).options())(Probe)
    config = scaled._deployment_config.autoscaling_config
    assert config.min_replicas == 1 and config.max_replicas == 4
    assert config.target_ongoing_requests == 16.0
    assert serve.deployment(name="probe", **Scale(3).options())(Probe).num_replicas == 3
    for bad in (
        {"replicas": 0},
        {"min_replicas": 2},
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": 0, "max_replicas": 0},
        {"max_ongoing_requests": 0},
    ):
        with pytest.raises(ValueError):
            Scale(**bad)  # type: ignore[arg-type]


def test_without_ray_the_message_names_the_extra() -> None:
    code = "import sys; sys.modules['ray'] = None; from truffula.cli import main; sys.exit(main(['cluster']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "pip install 'truffula[cluster]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_port_in_use_fails_before_ray_starts() -> None:
    pytest.importorskip("ray.serve")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "truffula.cli", "cluster", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (--port)" in r.stderr
    assert "Started Serve" not in r.stderr


def test_a_head_node_that_is_gone_is_named_at_once() -> None:
    pytest.importorskip("ray.serve")
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "cluster", "--address", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and time.monotonic() - t < 60
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr
