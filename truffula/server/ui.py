"""The web playground, served at ``GET /`` from files in ``server/ui`` (no build step). ``GET /``
is in the OpenAPI schema beside the compat ``POST /``, so the methods ``/`` answers are the
documented ones; the page's assets are not."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

router = APIRouter()

_DIR = Path(__file__).parent / "ui"
_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}


@router.get(
    "/",
    summary="The web playground (an HTML page)",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the playground page"}},
)
async def index() -> Response:
    page = _DIR / "index.html"
    if not page.exists():
        return HTMLResponse(
            "<!doctype html><title>truffula</title><p>truffula is running. API docs: <a href='/docs'>/docs</a>.</p>"
        )
    return FileResponse(page, media_type="text/html")


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    path = (_DIR / name).resolve()
    if path.parent != _DIR.resolve() or not path.is_file() or path.suffix not in _TYPES:
        return Response(status_code=404)
    return FileResponse(path, media_type=_TYPES[path.suffix])
