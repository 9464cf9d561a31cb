"""Runs in the client virtualenv (lorax-client 0.6.3, unmodified): prints what it received."""

from __future__ import annotations

import asyncio
import json
import sys

from lorax import AsyncClient, Client
from lorax.errors import ValidationError

url, prompt = sys.argv[1], sys.argv[2]
client = Client(url, timeout=120)
out: dict = {}

r = client.generate(prompt, max_new_tokens=6, return_k_alternatives=3, decoder_input_details=True)
out["generate"] = r.model_dump()

out["stream"] = [e.model_dump() for e in client.generate_stream(prompt, max_new_tokens=6)]


async def astream() -> list[dict]:
    ac = AsyncClient(url, timeout=120)
    return [
        e.model_dump()
        async for e in ac.generate_stream(prompt, max_new_tokens=6, return_k_alternatives=2)
    ]


out["async_stream"] = asyncio.run(astream())

errors = {}
for name, kwargs in {
    "zero_tokens": {"max_new_tokens": 0},
    "k_too_big": {"return_k_alternatives": 999},
    "long": {"max_new_tokens": 10**6},
}.items():
    try:
        client.generate(prompt, **kwargs)
        errors[name] = None
    except ValidationError as exc:
        errors[name] = ["ValidationError", str(exc)]
    except Exception as exc:
        errors[name] = [type(exc).__name__, str(exc)]
out["errors"] = errors
print(json.dumps(out))
