"""Runs in the client virtualenv (text-generation, unmodified): prints what it received."""

from __future__ import annotations

import json
import sys

from text_generation import Client
from text_generation.errors import ValidationError

url, prompt = sys.argv[1], sys.argv[2]
client = Client(url, timeout=120)
out: dict = {}
r = client.generate(prompt, max_new_tokens=5, top_n_tokens=3, decoder_input_details=True)
out["generate"] = r.model_dump()
out["stream"] = [
    e.model_dump() for e in client.generate_stream(prompt, max_new_tokens=5, top_n_tokens=2)
]
try:
    client.generate(prompt, max_new_tokens=5, top_n_tokens=500)
    out["error"] = None
except ValidationError as exc:
    out["error"] = ["ValidationError", str(exc)]
print(json.dumps(out))
