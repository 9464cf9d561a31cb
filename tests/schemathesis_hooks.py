"""Schemathesis hooks of the bounded (CI) run of tests/server/test_attack_load.py, loaded through
``SCHEMATHESIS_HOOKS``: generation is kept short (at most 4 new tokens, ``n`` at most 2), so the
run spends its time on many requests rather than on a few long ones. Values of the wrong type
are left alone: they are what the negative cases are made of."""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_NEW = 4


def _cap(body: dict[str, Any], name: str, cap: int) -> None:
    value = body.get(name)
    if value is None or (type(value) is int and value > cap):
        body[name] = cap


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    if path in ("/generate", "/generate_stream", "/", "/invocations"):
        params = body.get("parameters")
        if params is None:
            body["parameters"] = params = {}
        if isinstance(params, dict):
            _cap(params, "max_new_tokens", MAX_NEW)
    elif path in ("/v1/completions", "/v1/chat/completions"):
        _cap(body, "max_tokens", MAX_NEW)
        if "max_completion_tokens" in body:
            _cap(body, "max_completion_tokens", MAX_NEW)
        if type(body.get("n")) is int and body["n"] > 2:
            body["n"] = 2
