"""Log formats shared by truffula's processes: plain text, or one JSON object a line
(``--log-format json``; the API processes add request ids, the engine process logs the same
shape)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from truffula import envs

_FIELDS = ("method", "path", "status", "duration_ms", "engine_request_ids")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        for name in _FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_engine_logging() -> None:
    """Root logging of the engine process, in the format its server chose
    (``TRUFFULA_LOG_FORMAT``, set by ``truffula serve`` before it spawns the engine)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get(envs.TRUFFULA_LOG_FORMAT) == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
