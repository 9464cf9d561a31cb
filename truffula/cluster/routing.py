"""The adapter a request asks for, read from its body before it reaches a replica.

Serve's model multiplexing routes by this key: requests for one adapter go to the replicas that
already hold it. LoRAX and TGI routes name it in ``parameters.adapter_id`` (or merge several,
keyed by their sorted ids); OpenAI routes in ``model`` (the base model's id, or none, is the
base model). Requests for the base model have no key and balance by load.
"""

from __future__ import annotations

import json
from typing import Any

OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")
LORAX_ROUTES = ("/", "/generate", "/generate_stream")


def adapter_of(path: str, body: bytes, base_model_id: str) -> str | None:
    """The adapter key of a request, or None for the base model (and for bodies the replica
    will reject: it answers them in the route's dialect)."""
    if path not in OPENAI_ROUTES and path not in LORAX_ROUTES:
        return None
    try:
        data: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if path in OPENAI_ROUTES:
        return _named(data.get("model"), base_model_id)
    params = data.get("parameters")
    if not isinstance(params, dict):
        return None
    merged = params.get("merged_adapters")
    if isinstance(merged, dict) and isinstance(merged.get("ids"), list):
        ids = sorted(str(i) for i in merged["ids"])
        return "merge:" + ",".join(ids) if ids else None
    return _named(params.get("adapter_id"), base_model_id)


def _named(value: Any, base_model_id: str) -> str | None:
    if not isinstance(value, str) or value in ("", base_model_id):
        return None
    return value
