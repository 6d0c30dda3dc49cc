"""The error contract: every failure answers ``{"error": "..."}`` with a fitting status.

Bad input gets a 4xx (:class:`ApiError` carries its own status; lorasynth's errors are mapped
by kind); an unexpected failure gets ``500 {"error": "internal error ..."}``, logged, with no
traceback sent.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorasynth.errors import FaceError, ImageError, InputError, LibraryError, LorasynthError

log = logging.getLogger("lorasynth.apps.server")


class ApiError(Exception):
    """A refusal with its HTTP status (answered as ``{"error": message}``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def lorasynth_error_status(exc: LorasynthError) -> int:
    """404 for a missing library item, 413 for an image refused by size, 422 for face errors and
    refused numbers (:class:`InputError`: not finite, out of range), else 400."""
    status = 404 if isinstance(exc, LibraryError) and str(exc).startswith("no ") else 400
    if isinstance(exc, ImageError) and ("refused" in str(exc) or "too large" in str(exc)):
        status = 413
    if isinstance(exc, (FaceError, InputError)):
        status = 422
    return status


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` raises as ``{"error": ...}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(LorasynthError)
    async def _lorasynth_error(request, exc: LorasynthError):
        return JSONResponse({"error": str(exc)}, status_code=lorasynth_error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
