"""`sdrt serve`'s HTTP application: FastAPI routes over an Executor (local.py or remote.py).

Routes: AUTOMATIC1111's /sdapi/v1 (a1111.py), OpenAI's /v1/images (openai_api.py),
KServe v2's /v2/health/live and /ready, Prometheus' /metrics, the API docs at /docs
(Swagger UI served from this process, no CDN), and a web page at /.

Every request passes `Guard`, a plain ASGI middleware: the API key (every route but
health), the body size limit (413 before the body is read when Content-Length says so,
else as soon as it passes the limit), and one log line and metric per request. Prompts
are not logged unless --log-prompts. CORS is off unless --cors-origin names origins.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import time
from importlib import resources
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sdrt.engines.errors import InvalidInput, InvalidType, MissingFile, SdrtError

from . import a1111, openai_api
from .config import ServeConfig
from .executor import Executor, NotReady, QueueFull, UnknownModel
from .jobs import Stopped
from .metrics import Metrics

log = logging.getLogger("sdrt.serve")
HEALTH = ("/v2/health/live", "/v2/health/ready")
DOCS_ASSETS = "/docs-assets"
DEADLINE_HEADER = "X-Sdrt-Deadline"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over this server's limit of {limit:,} bytes (--max-body-mb)")


def create_app(config: ServeConfig, executor: Executor | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The application; `executor` defaults to running jobs in this process (local.py),
    or on Celery workers with config.queue_url (remote.py)."""
    from .executor import open_models

    metrics = metrics or Metrics()
    if executor is None:
        models = open_models(config.artifacts)
        if config.queue_url:
            from .remote import RemoteExecutor
            executor = RemoteExecutor(config, models, metrics)
        else:
            from .local import LocalExecutor
            executor = LocalExecutor(config, models, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        executor.start()
        try:
            yield
        finally:
            await run_in_threadpool(executor.close)

    app = FastAPI(title="sdrt", summary="Stable Diffusion over HTTP: AUTOMATIC1111's and OpenAI's image APIs",
                  version=_version(), docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.executor = executor
    app.state.metrics = metrics
    _mount_docs(app)
    _add_routes(app, config, executor, metrics)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, config=config, metrics=metrics, routes={r.path for r in app.routes})
    return app


def _version() -> str:
    from sdrt.runtime.infotext import sdrt_version
    return sdrt_version()


# -- errors ------------------------------------------------------------------------------------

def status_of(error: BaseException) -> tuple[int, dict[str, str]]:
    """HTTP status and headers for an error a job or a request raised."""
    if isinstance(error, QueueFull):
        return 429, {"Retry-After": str(error.retry_after)}
    if isinstance(error, NotReady):
        return 503, {"Retry-After": str(error.retry_after)}
    if isinstance(error, UnknownModel):
        return 404, {}
    if isinstance(error, Stopped):
        return {"deadline": 504, "interrupted": 409, "disconnected": 499}.get(error.reason, 503), {}
    if isinstance(error, (InvalidInput, InvalidType, MissingFile)):
        return 422, {}
    return 500, {}


def _message(error: BaseException) -> str:
    if isinstance(error, SdrtError) or isinstance(error, (ValueError, TypeError)):
        return str(error)
    return f"internal error ({type(error).__name__}); see the server's log"


def a1111_error(error: BaseException) -> JSONResponse:
    status, headers = status_of(error)
    if status == 500:
        log.error("request failed", exc_info=error)
    return JSONResponse({"error": type(error).__name__, "detail": _message(error)}, status, headers)


def openai_error(error: BaseException) -> JSONResponse:
    status, headers = status_of(error)
    if status == 500:
        log.error("request failed", exc_info=error)
    if status == 422:
        status = 400   # OpenAI answers invalid requests with 400
    return JSONResponse(openai_api.error_body(_message(error), status), status, headers)


# -- routes ------------------------------------------------------------------------------------

def _add_routes(app: FastAPI, config: ServeConfig, executor: Executor, metrics: Metrics) -> None:
    async def generate(job_maker: Callable[[], Any], request: Request) -> Any:
        seconds = _deadline(request, config.deadline_s)
        job, *rest = await run_in_threadpool(job_maker)
        job = _with_deadline(job, seconds)
        if config.log_prompts:
            log.info("job %s: prompt %r, negative %r", job.id, job.settings.get("prompt"),
                     job.settings.get("negative_prompt"))
        result = await executor.submit(job, request.is_disconnected)
        return job, rest, result

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_api.error_body(message, 400, where), 400)
        # Without the offending input: it may be megabytes of base64.
        shown = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]
        return JSONResponse({"error": "RequestValidationError", "detail": message,
                             "errors": json.loads(json.dumps(shown, default=str))}, 422)

    # AUTOMATIC1111 ------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img", tags=["AUTOMATIC1111"], summary="text to image")
    async def txt2img(body: a1111.Txt2ImgRequest, request: Request) -> Any:
        try:
            job, (model, fields), result = await generate(lambda: a1111.job_from_request(body, executor, False),
                                                          request)
        except Exception as e:   # noqa: BLE001 - every error is answered, in the web UI's shape
            return a1111_error(e)
        return a1111.response(job, model, fields, result)

    @app.post("/sdapi/v1/img2img", tags=["AUTOMATIC1111"], summary="image to image and inpainting")
    async def img2img(body: a1111.Img2ImgRequest, request: Request) -> Any:
        try:
            job, (model, fields), result = await generate(lambda: a1111.job_from_request(body, executor, True),
                                                          request)
        except Exception as e:   # noqa: BLE001
            return a1111_error(e)
        return a1111.response(job, model, fields, result)

    @app.get("/sdapi/v1/samplers", tags=["AUTOMATIC1111"])
    async def samplers() -> Any:
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers", tags=["AUTOMATIC1111"])
    async def schedulers() -> Any:
        return a1111.schedulers()

    @app.get("/sdapi/v1/sd-models", tags=["AUTOMATIC1111"])
    async def sd_models() -> Any:
        return a1111.sd_models(executor)

    @app.get("/sdapi/v1/options", tags=["AUTOMATIC1111"], summary="the settings clients read (current model)")
    async def options() -> Any:
        return {a1111.MODEL_SETTING: executor.model(None).title, a1111.CLIP_SKIP_SETTING: 1,
                "samples_format": "png"}

    @app.get("/sdapi/v1/loras", tags=["AUTOMATIC1111"], summary="LoRAs in --lora-dir, by name")
    async def loras() -> Any:
        folder = config.lora_dir
        if folder is None:
            return []
        return [{"name": p.stem, "alias": p.stem} for p in sorted(folder.glob("*.safetensors")) if p.is_file()]

    @app.get("/sdapi/v1/embeddings", tags=["AUTOMATIC1111"], summary="embeddings in --embedding-dir, by trigger")
    async def embeddings() -> Any:
        folder = config.embedding_dir
        names = [] if folder is None else sorted(p.stem for p in folder.glob("*.safetensors") if p.is_file())
        return {"loaded": {n: {} for n in names}, "skipped": {}}

    @app.get("/sdapi/v1/scripts", tags=["AUTOMATIC1111"])
    async def scripts() -> Any:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress", tags=["AUTOMATIC1111"])
    async def progress(skip_current_image: bool = False) -> Any:
        return executor.progress()

    @app.post("/sdapi/v1/interrupt", tags=["AUTOMATIC1111"], summary="stop the running generation between steps")
    async def interrupt() -> Any:
        return {"interrupted": executor.interrupt()}

    @app.post("/sdapi/v1/png-info", tags=["AUTOMATIC1111"], summary="read an image's generation parameters")
    async def png_info(body: dict[str, Any]) -> Any:
        try:
            if "image" not in body:
                raise InvalidInput("image is required: a base64 PNG")
            return await run_in_threadpool(a1111.png_info, body["image"], config.max_image_pixels)
        except Exception as e:   # noqa: BLE001
            return a1111_error(e)

    # OpenAI -------------------------------------------------------------------------------
    @app.post("/v1/images/generations", tags=["OpenAI"], summary="create images from a prompt")
    async def generations(body: openai_api.GenerationsRequest, request: Request) -> Any:
        fields = {**body.model_dump(exclude_none=True), **(body.model_extra or {})}
        try:
            job, _, result = await generate(lambda: openai_api.job_from_fields(fields, executor), request)
        except Exception as e:   # noqa: BLE001 - answered in OpenAI's error shape
            return openai_error(e)
        return openai_api.response(job, result)

    @app.post("/v1/images/edits", tags=["OpenAI"], summary="edit an image (multipart: image, mask, prompt)")
    async def edits(request: Request) -> Any:
        try:
            fields, image, mask = await _edit_form(request, config)
            job, _, result = await generate(
                lambda: openai_api.job_from_fields(
                    fields, executor, openai_api.edit_images(image, mask, config.max_image_pixels)), request)
        except HTTPException:
            raise
        except Exception as e:   # noqa: BLE001
            return openai_error(e)
        return openai_api.response(job, result)

    @app.get("/v1/models", tags=["OpenAI"], summary="the served models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "sdrt"}
                                           for m in executor.models.values()]}

    # health, metrics, page ---------------------------------------------------------------
    @app.get("/v2/health/live", tags=["health"])
    async def live() -> Any:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> Any:
        ok, why = executor.readiness()
        return JSONResponse({"ready": ok, **({"reason": why} if why else {})}, 200 if ok else 503)

    @app.get("/metrics", tags=["metrics"], include_in_schema=False)
    async def prometheus() -> Response:
        metrics.queue_depth.set(executor.queue_depth())
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())


async def _edit_form(request: Request, config: ServeConfig) -> tuple[dict[str, Any], bytes, bytes | None]:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=8, max_fields=64, max_part_size=config.max_body_bytes)
    except HTTPException:
        raise
    except Exception as e:   # noqa: BLE001 - a malformed multipart body
        raise InvalidInput(f"the body is not a valid multipart/form-data form: {e}") from None
    files = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
    if not files:
        raise InvalidInput("image is required: upload the image to edit as the multipart file field 'image'")
    if len(files) > 1:
        raise InvalidInput(f"{len(files)} images were sent; sdrt edits one image per request")
    mask_part = form.get("mask")
    if mask_part is not None and not isinstance(mask_part, UploadFile):
        raise InvalidInput("mask must be an uploaded file (a PNG with an alpha channel)")
    image = await files[0].read()
    mask = await mask_part.read() if mask_part is not None else None
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    return fields, image, mask


def _deadline(request: Request, server_s: float) -> float:
    """The request's deadline in seconds: --deadline, or less with the header
    `X-Sdrt-Deadline: SECONDS` (a client that knows it will give up sooner)."""
    text = request.headers.get(DEADLINE_HEADER)
    if text is None:
        return server_s
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise InvalidInput(f"{DEADLINE_HEADER}: {text!r:.40} is not a positive number of seconds")
    return min(seconds, server_s)


def _with_deadline(job: Any, seconds: float) -> Any:
    from .jobs import with_deadline
    return with_deadline(job, seconds)


def _page() -> str:
    path = resources.files("sdrt.serve") / "static" / "index.html"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "<!doctype html><title>sdrt</title><p>sdrt is running; the API is at <a href='/docs'>/docs</a>."


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI 5 from the fastapi-offline package's files, served here: FastAPI's
    default page loads its scripts from a CDN, which a server without internet (and a
    browser that should not be sent elsewhere) cannot use."""
    from fastapi.staticfiles import StaticFiles

    assets = _docs_assets()
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return HTMLResponse("<p>Install fastapi-offline (the serve extra) for the interactive docs; the API "
                                "description is at <a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="sdrt API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")


def _docs_assets() -> Any:
    try:
        folder = resources.files("fastapi_offline") / "static"
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


# -- the guard ---------------------------------------------------------------------------------

class Guard:
    """API key, body size limit, and per-request metrics and log line (plain ASGI, so
    streaming and disconnect detection pass through untouched)."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics, routes: set[str]):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.routes = routes
        key = config.api_key
        self._keys = None if key is None else (f"Bearer {key}".encode(),
                                               b"Basic " + base64.b64encode(f"sdrt:{key}".encode()))

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in self.routes else ("/docs-assets" if path.startswith(DOCS_ASSETS) else "other")
        status = {"code": 0}

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope, path):
                return await self._refuse(scope, sending, 401, "missing or wrong API key: send the header "
                                          "'Authorization: Bearer KEY'", {"WWW-Authenticate": 'Basic realm="sdrt"'})
            length = _content_length(scope)
            limit = self.config.max_body_bytes
            if length is not None and length > limit:
                return await self._refuse(scope, sending, 413, BodyTooLarge(limit).detail)
            await self.app(scope, _limited(receive, limit), sending)
        finally:
            seconds = time.perf_counter() - started
            code = status["code"] or 499   # no answer started: the client went away
            self.metrics.requests.labels(route, str(code)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            log.info("%s %s %d %.3fs", scope.get("method"), path, code, seconds)

    def _authorized(self, scope: dict, path: str) -> bool:
        if self._keys is None or path in HEALTH:
            return True
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if given.startswith(b"Basic "):   # a browser's login dialog: any user name, the key as password
            try:
                user_pass = base64.b64decode(given[6:], validate=True)
            except ValueError:
                return False
            given = b"Basic " + base64.b64encode(b"sdrt:" + user_pass.partition(b":")[2])
        return any(hmac.compare_digest(given, k) for k in self._keys)

    async def _refuse(self, scope: dict, send: Callable, status: int, message: str,
                      headers: dict[str, str] | None = None) -> None:
        path = scope.get("path", "")
        body = openai_api.error_body(message, status) if path.startswith("/v1/") else {"detail": message}
        response = JSONResponse(body, status, headers)
        await response(scope, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _limited(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """`receive` that raises 413 once the body passes `limit` bytes (a chunked body
    has no Content-Length to check up front)."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped
