"""JSON bodies encoded with msgspec (several times faster than the standard library for the
token records of a response), and the gzip rule: non-streamed bodies are compressed when the
client sends ``Accept-Encoding: gzip``; event streams never are."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def json_bytes(content: Any) -> bytes:
    return _encoder.encode(content)
