"""`cxrtune serve`: one web page where a user uploads chest X-rays and sees, per image,
the model's class probabilities as bars and its Grad-CAM overlay.

FastAPI serves the page, rendered on the server from a plain HTML form (no JavaScript),
and ``POST /api/predict``, the same answers as JSON. Every upload goes through
``predict.answers``, the path `cxrtune predict` takes, so the page shows what the command
line prints for the same file. The request body is capped before it is parsed
(``BodyLimit``); an upload that is not an image is answered with a message naming it.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError
from .images import NamedImage
from .model import Classifier
from .predict import Answer, answers, load_classifier

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_MAX_UPLOAD_MB", "MAX_FILES", "DISCLAIMER", "ServeConfig",
           "BodyLimit", "create_app", "serve"]

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_UPLOAD_MB = 64.0  # a request's whole body: a few DICOM studies
MAX_FILES = 64  # images per request: each is decoded and held in memory
UPLOAD_FIELD = "images"
ACCEPT = ".png,.jpg,.jpeg,.tif,.tiff,.bmp,.dcm,.dicom,image/*,application/dicom"
DISCLAIMER = ("cxrtune is a research tool, not a medical device. Its predictions are not a diagnosis and must "
              "not be used to make clinical decisions.")
TEMPLATE = Path(__file__).with_name("page.html")
_MB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """`cxrtune serve`'s options."""

    model: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    cams: bool = True
    tracking_uri: Optional[str] = None

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be 0-65535 (0 picks a free port)")
        if not self.max_upload_mb > 0:
            raise ConfigError(f"--max-upload-mb {self.max_upload_mb}: must be > 0 (megabytes per request)")


# ---------------------------------------------------------------- the upload limit


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request whose body is over ``max_bytes`` gets a 413 before any
    of it is parsed (by its Content-Length when it declares one, else as it arrives)."""

    def __init__(self, app: Any, max_bytes: int, refusal: Any) -> None:
        self.app, self.max_bytes, self.refusal = app, max_bytes, refusal

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refusal(scope, int(declared))(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:  # only a body without a Content-Length gets here, before any answer
            await self.refusal(scope, received)(scope, receive, send)


# ---------------------------------------------------------------- the page


@dataclass(frozen=True)
class Shown:
    """One image as the page and the JSON show it."""

    name: str
    probabilities: Optional[dict[str, float]]
    predicted: Optional[str]
    error: Optional[str]
    note: Optional[str]
    cam_png: Optional[bytes]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.name}
        if self.error:
            return {**out, "error": self.error}
        out.update(probabilities=self.probabilities, predicted=self.predicted)
        if self.note:
            out["note"] = self.note
        if self.cam_png:
            out["cam_png_base64"] = base64.b64encode(self.cam_png).decode("ascii")
        return out


def _shown(answer: Answer) -> Shown:
    png = None
    if answer.cam is not None:
        buffer = io.BytesIO()
        answer.overlay(buffer)
        png = buffer.getvalue()
    return Shown(answer.name, answer.probabilities, answer.predicted, answer.error, answer.note, png)


class Page:
    """The model, and the one HTML page that shows its answers."""

    def __init__(self, classifier: Classifier, model: str, max_upload_bytes: int, cams: bool) -> None:
        import jinja2

        self.classifier, self.model, self.max_upload_bytes, self.cams = classifier, model, max_upload_bytes, cams
        self._template = jinja2.Environment(autoescape=True).from_string(TEMPLATE.read_text())
        self._lock = threading.Lock()  # one forward pass at a time: Grad-CAM hooks the shared network

    def predict(self, images: list[NamedImage]) -> list[Shown]:
        with self._lock:
            found = list(answers(self.classifier, images, self.classifier.spec.batch_size, self.cams))
            return [_shown(a) for a in found]

    def render(self, shown: Optional[list[Shown]] = None, error: Optional[str] = None) -> str:
        return self._template.render(model=self.model, classes=self.classifier.classes, shown=shown or [],
                                     error=error, disclaimer=DISCLAIMER, accept=ACCEPT, field=UPLOAD_FIELD,
                                     max_files=MAX_FILES, limit_mb=f"{self.max_upload_bytes / _MB:g}",
                                     image_size=self.classifier.image_size, data_uri=_data_uri)

    def too_large(self, received: int) -> str:
        return (f"the upload is {received / _MB:.1f} MB, over this server's limit of "
                f"{self.max_upload_bytes / _MB:g} MB per request: upload fewer or smaller images at a time "
                "(the limit is cxrtune serve --max-upload-mb)")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


async def _uploads(request: Any) -> tuple[list[NamedImage], Optional[str]]:
    """The uploaded files as named images, or why there are none."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except (HTTPException, MultiPartException) as exc:  # malformed multipart, too many files
        return [], f"the upload cannot be read: {getattr(exc, 'detail', None) or getattr(exc, 'message', exc)}"
    files = [f for f in form.getlist(UPLOAD_FIELD) if isinstance(f, UploadFile)]
    images = [NamedImage(f.filename or f"image[{i}]", await f.read()) for i, f in enumerate(files)
              if f.filename or f.size]  # a form sent with no file chosen has one empty, unnamed part
    if not images:
        return [], (f"no images uploaded: choose one or more PNG, JPEG or DICOM files (form field "
                    f"{UPLOAD_FIELD!r}, multipart/form-data)")
    return images, None


def create_app(classifier: Classifier, model: str, max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * _MB),
               cams: bool = True) -> FastAPI:
    """The FastAPI app: ``GET /`` the page, ``POST /`` an upload shown on it, ``POST
    /api/predict`` the same as JSON, ``GET /health``."""
    page = Page(classifier, model, max_upload_bytes, cams)
    # no /docs: FastAPI's API pages load their scripts from a CDN, which a hospital network may block
    app = FastAPI(title="cxrtune", docs_url=None, redoc_url=None, openapi_url=None)

    async def upload(request: Request) -> tuple[list[Shown], Optional[str]]:
        images, problem = await _uploads(request)
        if problem:
            return [], problem
        return await run_in_threadpool(page.predict, images), None

    def status(shown: list[Shown], problem: Optional[str]) -> int:
        # 400 when nothing could be predicted: no upload, or no upload was an image
        return 400 if problem or not any(s.error is None for s in shown) else 200

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page.render()

    @app.post("/", response_class=HTMLResponse)
    async def upload_page(request: Request) -> HTMLResponse:
        shown, problem = await upload(request)
        return HTMLResponse(page.render(shown, problem), status_code=status(shown, problem))

    @app.post("/api/predict")
    async def upload_json(request: Request) -> JSONResponse:
        shown, problem = await upload(request)
        body = {"error": problem} if problem else {"model": model, "classes": list(classifier.classes),
                                                   "results": [s.to_dict() for s in shown]}
        return JSONResponse(body, status_code=status(shown, problem))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model, "classes": list(classifier.classes)}

    def refusal(scope: dict, received: int) -> Any:
        message = page.too_large(received)
        if scope.get("path", "").startswith("/api/"):
            return JSONResponse({"error": message}, status_code=413)
        return HTMLResponse(page.render(error=message), status_code=413)

    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes, refusal=refusal)
    return app


# ---------------------------------------------------------------- the server


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, bound here so that a taken port or an unknown
    host is a clear error (and port 0 a free port) before the server starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); choose "
                          "another --port (0 picks a free one) or a --host of this machine") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(cfg: ServeConfig) -> None:
    """Load the model, bind, and serve until interrupted."""
    import uvicorn

    cfg.validate()
    classifier = load_classifier(cfg.model, cfg.tracking_uri)
    sock = _bound_socket(cfg.host, cfg.port)
    app = create_app(classifier, cfg.model, int(cfg.max_upload_mb * _MB), cfg.cams)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    if not _is_loopback(host):
        log.warning("listening on %s: anyone who can reach this port can upload images and see the model's "
                    "answers (there is no login); bind to 127.0.0.1 unless that is intended", host)
    log.info("serving %s (%s) at http://%s:%d/ ; Ctrl-C stops", cfg.model, ", ".join(classifier.classes),
             shown_host, port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
