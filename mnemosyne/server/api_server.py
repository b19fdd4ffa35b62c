"""The FastAPI app: routes, API-key check, and every error in OpenAI's JSON shape.

    GET  /v1/models               GET /health      GET /metrics (Prometheus)     GET /version
    POST /v1/completions          POST /tokenize
    POST /v1/chat/completions     POST /detokenize

With an API key, every route but /health and /metrics needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnemosyne import __version__
from mnemosyne.errors import InvalidRequestError
from mnemosyne.server.errors import APIError, EngineDeadError, error_body, to_api_error
from mnemosyne.server.metrics import ServerMetrics
from mnemosyne.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from mnemosyne.server.request_body import CompletionRoute, JSONRoute
from mnemosyne.server.serving import ServingContext, now_s
from mnemosyne.server.serving_chat import create_chat_completion
from mnemosyne.server.serving_completions import create_completion

logger = logging.getLogger(__name__)


def build_app(ctx: ServingContext, metrics: ServerMetrics, api_key: str | None = None) -> FastAPI:
    """The app over a running `AsyncEngine`; the engine stops when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.prompts.close()
        await asyncio.to_thread(ctx.engine.stop)

    app = FastAPI(title="Mnemosyne", lifespan=lifespan)
    _install_error_handlers(app)
    app.include_router(_api_router(ctx, api_key))
    _openapi_400_not_422(app)

    @app.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_alive:
            return EngineDeadError(ctx.engine.dead_reason or "stopped").response()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _api_router(ctx: ServingContext, api_key: str | None) -> APIRouter:
    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                HTTPStatus.UNAUTHORIZED,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    router = APIRouter(dependencies=[Depends(check_key)], route_class=JSONRoute)

    @router.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": now_s(),
            "owned_by": "mnemosyne",
            "max_model_len": ctx.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(body, ctx, raw)

    router.add_api_route(
        "/v1/completions", completions, methods=["POST"], route_class_override=CompletionRoute
    )

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(body, ctx, raw)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        body.check_unknown_fields()
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of 'prompt' and 'messages'")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            tokens = await ctx.prompts.apply_chat_template(messages, body.add_generation_prompt, None)
        else:
            tokens = await ctx.prompts.encode(body.prompt or "", body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        body.check_unknown_fields()
        ctx.check_model(body.model)
        ctx.check_token_ids(body.tokens)
        return {"prompt": await ctx.prompts.decode(body.tokens)}

    return router


_MAX_DETAIL_CHARS = 200


def validation_error_body(exc: RequestValidationError) -> dict:
    """OpenAI's error shape naming the first bad field and pydantic's short reason; never
    the request body (it may be huge or secret) nor `str(exc)` (it names our source files)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc)[:_MAX_DETAIL_CHARS] or None
    reason = str(first.get("msg", "invalid request"))[:_MAX_DETAIL_CHARS]
    if first.get("type") == "json_invalid":
        param, message = None, f"the body is not valid JSON: {reason}"
    else:
        message = f"invalid value for {param!r}: {reason}" if param else f"invalid request body: {reason}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_body(message, "invalid_request_error", param)


def _openapi_400_not_422(app: FastAPI) -> None:
    """FastAPI documents 422 for bad bodies; this server answers 400 in OpenAI's shape."""
    error_schema = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    k: {"type": "string", "nullable": True} for k in ("message", "type", "param", "code")
                },
            }
        },
    }
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default_openapi()
            for methods in schema.get("paths", {}).values():
                for op in methods.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses["400"] = {
                            "description": "Invalid request (OpenAI error shape)",
                            "content": {"application/json": {"schema": error_schema}},
                        }
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> Response:
        return to_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(validation_error_body(exc), HTTPStatus.BAD_REQUEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s", request.url.path)
        return to_api_error(exc).response()
