"""Start or join Ray, deploy the application, wait, and stop.

``run`` is the foreground process of ``truffula cluster``: it checks the port, starts a local
Ray instance (or joins ``--address``), starts Serve's HTTP proxy on ``--host``/``--port``,
deploys the router and the replicas (a replica that fails to start fails the deploy with its
error), prints the URL, and waits. SIGINT/SIGTERM, or ``truffula cluster --stop`` from another
shell, deletes the application; a local Ray instance started here stops with the process.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from typing import Any

import ray
from ray import serve

from truffula.cluster.app import APP_NAME, Scale, build
from truffula.config import EngineConfig
from truffula.server.launch import bind_socket
from truffula.server.settings import ServerSettings

log = logging.getLogger("truffula.cluster")
POLL_S = 1.0
STOP_TIMEOUT_S = 60.0


def connect(address: str | None, start: bool) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one running on this machine), or start
    a local one when there is none and ``start`` says so. A head node that is gone is an error
    that names the address."""
    if address is not None and (why := unreachable(address)):  # Ray itself waits minutes
        raise SystemExit(f"truffula: error: cannot reach the Ray cluster at {address}: {why}")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None and start:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError) as exc:
        where = address or "this machine"
        raise SystemExit(
            f"truffula: error: cannot reach the Ray cluster at {where}: {exc}"
        ) from exc


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why a TCP connection to ``address``'s host and port (``host:port``, ``ray://host:port``)
    does not open within ``timeout_s``; None when it does, or for ``auto``."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None  # "auto", or a form Ray judges itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return None


def run(settings: ServerSettings, config: EngineConfig, scale: Scale, address: str | None) -> int:
    if address is None:  # a port in use fails before Ray starts
        bind_socket(settings.host, settings.port).close()
    connect(address, start=True)
    stop = {"signal": 0}

    def on_signal(sig: int, frame: Any) -> None:
        stop["signal"] = sig

    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(build(settings, config, scale), name=APP_NAME, route_prefix="/")
        except Exception as exc:
            print(f"truffula: error: the replicas did not start: {exc}", file=sys.stderr)
            for message in _deploy_errors():
                print(message, file=sys.stderr)
            return 1
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        count = (
            f"{scale.replicas} replica{'s' if scale.replicas > 1 else ''}"
            if scale.min_replicas is None
            else f"{scale.min_replicas}-{scale.max_replicas} replicas (autoscaled)"
        )
        print(
            f"truffula {settings.version} serving {settings.model_id} at http://{host}:"
            f"{settings.port} ({count} on Ray Serve)",
            flush=True,
        )
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"] and _deployed():
            time.sleep(POLL_S)
        if stop["signal"]:
            serve.delete(APP_NAME)
        print("truffula: stopped", flush=True)
        return 0
    finally:
        if address is None:
            serve.shutdown()
        ray.shutdown()


def stop(address: str | None) -> int:
    """``truffula cluster --stop``: delete the application from the cluster it runs on."""
    connect(address or "auto", start=False)
    try:
        if not _deployed():
            print("truffula: no truffula application is running on this Ray cluster")
            return 1
        serve.delete(APP_NAME, _blocking=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if not _deployed():
                    break
            except Exception:  # the foreground process stopped Serve with its own Ray
                break
            time.sleep(POLL_S)
        print("truffula: stopped")
        return 0
    finally:
        ray.shutdown()


def _deploy_errors() -> list[str]:
    """What Serve says of each deployment of the application that failed (a replica's
    constructor error, its traceback)."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:
        return []
    if app is None:
        return []
    return [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]


def _deployed() -> bool:
    return APP_NAME in serve.status().applications
