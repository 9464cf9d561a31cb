"""``truffula cluster``: ``truffula serve``'s flags, N replicas on Ray Serve behind one endpoint.

Every flag of ``truffula serve`` means what it means there (each replica gets the same
``ServerSettings`` and ``EngineConfig``; ``--host``/``--port`` are Serve's HTTP endpoint), plus
the replicas' count or autoscaling bounds, the resources of each, and the Ray cluster to join.
``truffula cluster --stop`` deletes the running application. Needs
``pip install 'truffula[cluster]'`` (Ray Serve).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any

from truffula.cli import serve
from truffula.cli.args import engine_config

if TYPE_CHECKING:
    from truffula.cluster.app import Scale
    from truffula.config import EngineConfig
    from truffula.server.settings import ServerSettings

EXTRA_HINT = "truffula cluster needs Ray Serve: pip install 'truffula[cluster]'"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    serve.add_parser(scratch)
    serve_flags = scratch.choices["serve"]
    c = sub.add_parser(
        "cluster",
        help="run replicas of the server on Ray Serve behind one endpoint, routed by adapter",
        parents=[serve_flags],
        conflict_handler="resolve",
    )
    g = c.add_argument_group("replicas (Ray Serve)")
    g.add_argument("--replicas", type=int, default=1, help="replicas, each one engine")
    g.add_argument(
        "--min-replicas",
        type=int,
        default=None,
        help="autoscale between --min-replicas and --max-replicas on requests in flight",
    )
    g.add_argument("--max-replicas", type=int, default=None)
    g.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=16.0,
        help="autoscaling: requests in flight per replica the autoscaler aims at",
    )
    g.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=64,
        help="requests sent to one replica at once; an adapter's requests go to another "
        "replica only when those holding it are at this limit",
    )
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica")
    g.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="Ray GPUs per replica (default: 1 when the engine runs on CUDA, else 0)",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join, e.g. ray://head:10001 or 'auto' (default: start one here)",
    )
    g.add_argument(
        "--stop",
        action="store_true",
        help="stop the truffula application running on the Ray cluster (--address, default: "
        "the one on this machine)",
    )
    c.set_defaults(func=run)


def ray_available() -> bool:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    if not ray_available():
        print(f"truffula: error: {EXTRA_HINT}", file=sys.stderr)
        return 2
    from truffula.cluster import launch

    if args.stop:
        return launch.stop(args.address)
    if args.adapter_root is None:  # the replicas' working directory is Ray's, not this one
        args.adapter_root = os.getcwd()
    settings, config, scale = _plan(args)
    return launch.run(settings, config, scale, args.address)


def application(args: dict[str, str]) -> Any:
    """The application for Ray Serve's own tools (``serve run``, ``serve deploy``, a KubeRay
    ``RayService``): ``import_path: truffula.cli.cluster:application`` with
    ``args: {flags: "--replicas 2 --adapter-root /adapters ..."}``, the flags of this command
    (``--host``/``--port``, ``--address`` and ``--stop`` are Serve's config's business there)."""
    from truffula.cli import build_parser
    from truffula.cluster.app import build

    flags = shlex.split(str(args.get("flags", "")))
    return build(*_plan(build_parser().parse_args(["cluster", *flags])))


def _plan(args: argparse.Namespace) -> tuple[ServerSettings, EngineConfig, Scale]:
    from truffula.cluster.app import Scale

    config = engine_config(args)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if _on_cuda(config.model.device) else 0.0
    scale = Scale(
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        target_ongoing_requests=args.target_ongoing_requests,
        num_cpus=args.cpus_per_replica,
        num_gpus=gpus,
    )
    return serve.server_settings(args), config, scale


def _on_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()
