"""The playground at `/`: a page that translates one text with the bare backbone and with every adapter that
matches its languages and domain, side by side, streaming tokens as they come, over the adapters table.

Static HTML, CSS and plain JavaScript shipped as package data (`serving/static/`; no build step, nothing
loaded from elsewhere). The page is a client of the public API like any other: GET /v1/adapters, POST
/v1/translate per adapter, POST /v1/generate with `adapter: null` for the bare backbone, and `stream: true`
(read with fetch, as EventSource cannot POST) where the service streams.

With API keys, the three static files are served without one (`guard.OPEN_PATHS`): they hold no data, and a
browser cannot send `Authorization: Bearer` when it navigates to a page. Every call the page makes carries
the key the user types into it, which it keeps in sessionStorage (this tab only). Its Content-Security-Policy
lets it run only its own script and talk only to this service.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from adaptkit.serving.guard import OPEN_PATHS

FILES = {  # route: (file in serving/static, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
assert set(FILES) <= OPEN_PATHS, "the guard would ask for a key before the page can ask for one"

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_playground(app: FastAPI) -> None:
    """GET / (the page), /playground.js and /playground.css on `app`; read once, here."""
    static = resources.files("adaptkit.serving") / "static"
    for route, (name, media_type) in FILES.items():
        app.add_api_route(route, _serving((static / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False, name=f"playground:{name}")


def _serving(body: bytes, media_type: str):
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve
