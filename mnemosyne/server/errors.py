"""Errors of the HTTP API, in OpenAI's JSON shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Every exception a handler can raise maps to exactly one status here; nothing a client
sends can reach the engine core as an unhandled exception.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from mnemosyne.errors import ContextLengthError, InvalidRequestError


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == HTTPStatus.UNAUTHORIZED else None
        return JSONResponse(self.body(), self.status, headers)


class ServerOverloadedError(APIError):
    """The bounded waiting queue is full: 503, retry later."""

    def __init__(self, num_waiting: int, max_waiting: int) -> None:
        super().__init__(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"server overloaded: {num_waiting} requests are waiting (limit --max-waiting-requests "
            f"{max_waiting}); retry later",
            type="server_overloaded",
            code="queue_full",
        )


class EngineDeadError(APIError):
    """The engine loop stopped (a worker died, or the server is shutting down): 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            HTTPStatus.SERVICE_UNAVAILABLE, f"engine is not running: {reason}", type="engine_unavailable"
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def to_api_error(exc: Exception) -> APIError:
    """Map engine-side request errors to HTTP ones (anything else is a 500 bug)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(HTTPStatus.BAD_REQUEST, str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(HTTPStatus.BAD_REQUEST, str(exc))
    return APIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc!r}", type="internal_error")
