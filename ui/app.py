"""``cbmir ui``: a small local web page over a running cbmir server, talking to it through ``RetrievalClient``.

The browser never sees the server's address, token or file paths: it sends an image or an archive id to this
application, which queries the server and returns hits as JSON; thumbnails come from the server's
``GetThumbnails`` by archive id. Everything the page needs is served from the package (no CDN, no build step).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cbmir.client import RetrievalClient, RetrievalError
from cbmir.errors import CbmirError, InvalidInputError

STATIC = resources.files("cbmir.ui") / "static"


@dataclass(frozen=True)
class UiConfig:
    """What the page may do: upload size, hits per query, thumbnail side, and an optional eval document."""

    max_upload_mb: int = 32
    thumbnail_side: int = 160
    eval_doc: dict[str, Any] | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _preview(data: bytes) -> str | None:
    """A PNG data URL of the query as the server will see it (DICOM with its own window); None if undecodable."""
    try:
        from cbmir.extractors.imaging import decode_image
        from cbmir.server.thumbnails import thumbnail_png

        png, _, _ = thumbnail_png(decode_image(data, source="upload"), 320)
    except CbmirError:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _number(form: Any, field: str, kind: type[int] | type[float], default: float | None) -> Any:
    """The form field as a number (``default`` when empty); a one-line error naming the field otherwise."""
    value = str(form.get(field) or "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        wanted = "a whole number" if kind is int else "a number"
        raise InvalidInputError(f"{field} must be {wanted}, got {value[:40]!r}") from None


def _search_options(form: Any) -> dict[str, Any]:
    """Search keyword options for :class:`RetrievalClient` from the page's form (the server checks ranges)."""
    predict = str(form.get("predict_class") or "") in ("1", "true", "on")
    return {
        "k": _number(form, "k", int, 10),
        "method": str(form.get("method") or ""),
        "rerank": str(form.get("rerank") or "") or None,
        "k_prep": _number(form, "k_prep", int, 0),
        "group_by": str(form.get("group_by") or ""),
        "group_size": _number(form, "group_size", int, 0),
        "max_distance": _number(form, "max_distance", float, None),
        "expand": _number(form, "expand", int, 0),
        "reciprocal_k1": _number(form, "reciprocal_k1", int, 0),
        "predict_class": predict,
        "class_vote": _number(form, "class_vote", int, 0) if predict else 0,
    }


def create_app(client: RetrievalClient, config: UiConfig | None = None) -> FastAPI:
    """The web application; ``client`` holds the connection (and token) to the cbmir server."""
    config = config or UiConfig()
    app = FastAPI(title="cbmir", docs_url=None, redoc_url=None, openapi_url=None)
    limit = config.max_upload_mb * 1024 * 1024

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/eval", response_class=HTMLResponse)
    def eval_page() -> str:
        return (STATIC / "eval.html").read_text()

    @app.get("/api/info")
    def info() -> JSONResponse:
        try:
            reply = client.index_info()
        except RetrievalError as exc:
            return _error(502, f"{exc.status}: {exc.message}")
        return JSONResponse(
            {
                "count": reply.count,
                "version": reply.version,
                "methods": [m.name for m in reply.methods],
                "default_method": reply.default_method,
                "filter_fields": list(reply.filter_fields),
                "max_k": reply.max_k,
                "max_upload_mb": config.max_upload_mb,
                "can_predict_class": "predict_class" in reply.capabilities,
            }
        )

    @app.post("/api/search")
    async def search(request: Request) -> JSONResponse:
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + 64 * 1024:
            return _error(413, f"upload of {declared} bytes exceeds the limit of {config.max_upload_mb} MB")
        form = await request.form(max_files=1, max_fields=30)
        upload = form.get("image")
        try:
            options = _search_options(form)
            filters = json.loads(str(form.get("filters") or "{}"))
            if not isinstance(filters, dict):
                raise ValueError("filters must be an object")
            if upload is not None and not isinstance(upload, str):
                data = await upload.read(limit + 1)
                if len(data) > limit:
                    return _error(413, f"upload exceeds the limit of {config.max_upload_mb} MB")
                hits = client.search_image(data, filters=filters, **options)
                query = {"kind": "image", "name": upload.filename or "upload", "preview": _preview(data)}
            elif form.get("archive_id"):
                archive_id = str(form.get("archive_id"))
                hits = client.search_id(archive_id, filters=filters, **options)
                query = {"kind": "archive_id", "name": archive_id, "preview": None}
            else:
                return _error(400, "choose an image file or an archive id")
        except RetrievalError as exc:
            return _error(400, f"{exc.status}: {exc.message}")
        except (InvalidInputError, ValueError) as exc:
            return _error(400, str(exc))
        return JSONResponse(
            {
                "query": query,
                "hits": [
                    {"id": h.id, "rank": h.rank, "distance": h.distance, "group": h.group, "metadata": h.metadata}
                    for h in hits
                ],
                "timings_ms": client.last_timings_ms,
                "predicted_class": client.last_predicted_class,
            }
        )

    @app.get("/api/thumbnail")
    def thumbnail(id: str, side: int = 0) -> Response:
        try:
            (item,) = client.thumbnails([id], max_side=side or config.thumbnail_side)
        except RetrievalError as exc:
            return _error(400, f"{exc.status}: {exc.message}")
        if item.error:
            return _error(404, item.error)
        return Response(item.png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/eval")
    def evaluation() -> JSONResponse:
        if config.eval_doc is None:
            return _error(404, "no evaluation loaded; start cbmir ui with --eval RESULT.json (from cbmir eval --json)")
        return JSONResponse(config.eval_doc)

    return app
