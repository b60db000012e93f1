"""`esep-jax serve`: an HTTP search service over one bundle (FastAPI on uvicorn), JAX-free.

Endpoints:
- `GET /health`: liveness, 200 as soon as the process listens.
- `GET /ready`: 200 with the bundle's facts once it is loaded, verified and warmed up (the encoder loaded and
  one search run), 503 until then. A bundle that fails to load stops the server (the CLI's one-line error).
- `POST /search`: a JSON object with
    `queries`   a text or a list of texts, encoded with the bundle's encoder and query prompt, and/or
    `vectors`   one query embedding or a list of them (the encoder's, before the head); given with `queries`,
                the vectors are searched and the texts serve BM25 (and are echoed back),
    `k`         results per query (default 10),
    `hybrid`    `true` or `{"k_rrf", "dense_weight", "bm25_weight", "depth"}`: dense + BM25 fused by RRF
                (needs texts and a bundle exported with `--bm25`),
    `documents` whether hits carry `{"title", "text"}` when the bundle stores documents (default true).
  It answers `{"k", "hybrid", "results": [{"query", "hits": [{"rank", "id", "score", "document"?}]}]}`.

Bad requests get a JSON `{"error": "one line naming the problem", ...}`: 400 malformed JSON, 413 a body over the
limit, 422 an invalid field (unknown fields included) or a query the searcher refuses (wrong dimension, NaN,
k too large); 503 while loading. An unexpected failure is a 500 `{"error": "internal error"}` — the traceback goes
to the server's log, never to the client.

The bundle is loaded once, in a thread started next to the server, with every check of `Searcher.load`
(checksums; with a key, the signature). Requests run in uvicorn's thread pool; the encoder is used by one
request at a time (a lock), numpy and ScaNN searches run concurrently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import threading

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handler's (string) annotation here

from esep_jax.errors import InputError
from esep_jax.serving.errors import QueryError
from esep_jax.serving.hybrid import Fusion
from esep_jax.serving.searcher import Searcher

LOG = logging.getLogger("esep_jax.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it, a 4xx (a server must bound the work a request can cause)."""

    max_batch: int = 256
    max_k: int = 1000
    max_query_chars: int = 20_000
    max_body_bytes: int = 8 << 20


class Service:
    """The bundle behind the server: loading state, the searcher, and the encoder for text queries."""

    def __init__(self, bundle: str, key: bytes | None = None, limits: Limits = Limits()):
        self.bundle, self.key, self.limits = bundle, key, limits
        self.searcher: Searcher | None = None
        self.error: Exception | None = None  # why loading failed (the server then stops)
        self.encoder_error: str | None = None  # why text queries cannot be encoded here (vectors still work)
        self._encode_lock = threading.Lock()
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self, on_failure=lambda: None) -> None:
        """Loads and warms up the bundle; on failure records the error and calls `on_failure`."""
        try:
            searcher = Searcher.load(self.bundle, key=self.key)
            probe = np.zeros((1, searcher.input_dim), np.float32)
            if searcher.manifest.get("encoder", {}).get("name"):
                try:
                    probe = self.encode(["warm-up"], searcher)
                except QueryError as error:
                    self.encoder_error = str(error)
            else:
                self.encoder_error = "the bundle records no encoder, so texts cannot be encoded; send vectors"
            searcher.search(probe, 1)  # ScaNN's first search allocates; keep that out of the first request
            self.searcher = searcher
            self._ready.set()
        except Exception as error:  # noqa: BLE001 - any failure stops the server; the CLI prints InputErrors
            self.error = error
            on_failure()

    def encode(self, texts: list[str], searcher: Searcher | None = None) -> np.ndarray:
        """Query embeddings of `texts` with the bundle's encoder and query prompt."""
        from esep_jax.data.encoders import EncoderNotInstalledError, encode_texts

        searcher = searcher or self.searcher
        if self.encoder_error:
            raise QueryError(self.encoder_error)
        manifest = searcher.manifest
        try:
            with self._encode_lock:
                return encode_texts(texts, encoder=manifest["encoder"]["name"],
                                    prompt=manifest["encoder"].get("query_prompt") or "",
                                    normalize=bool(manifest.get("normalized", True)), show_progress=False)
        except EncoderNotInstalledError as error:
            raise QueryError(str(error)) from None
        except ValueError as error:
            raise QueryError(f"encoder: {error}") from None

    def describe(self) -> dict:
        """What /ready reports about the loaded bundle."""
        searcher = self.searcher
        manifest = searcher.manifest
        return {"ready": True, "bundle": str(self.bundle), "documents": searcher.num_documents,
                "input_dim": searcher.input_dim, "output_dim": searcher.output_dim,
                "encoder": manifest.get("encoder", {}).get("name"), "text_queries": self.encoder_error is None,
                "document_store": searcher.has_documents, "hybrid": searcher.has_bm25,
                "index": manifest["index"].get("strategy"), "head": manifest["head"].get("trained_as"),
                "limits": dataclasses.asdict(self.limits),
                **({"text_queries_unavailable": self.encoder_error} if self.encoder_error else {})}

    def search(self, request) -> dict:
        """The response to a validated `SearchRequest` (raises `QueryError` for what the searcher refuses)."""
        searcher, limits = self.searcher, self.limits
        texts = [request.queries] if isinstance(request.queries, str) else request.queries
        vectors = request.vectors
        if texts is None and vectors is None:
            raise QueryError("give 'queries' (texts) or 'vectors'")
        if vectors is not None:
            if vectors and not isinstance(vectors[0], list):
                vectors = [vectors]  # one vector is one query
            if any(len(v) != len(vectors[0]) for v in vectors):
                raise QueryError("vectors: every vector must have the same length")
        count = len(texts) if texts is not None else len(vectors)
        if count == 0:
            raise QueryError("no queries")
        if count > limits.max_batch:
            raise QueryError(f"{count} queries in one request; the limit is {limits.max_batch}")
        if texts is not None and vectors is not None and len(texts) != len(vectors):
            raise QueryError(f"{len(texts)} queries and {len(vectors)} vectors: give one text per vector")
        for i, text in enumerate(texts or []):
            if len(text) > limits.max_query_chars:
                raise QueryError(f"queries[{i}]: {len(text)} characters; the limit is {limits.max_query_chars}")
        if request.k > min(limits.max_k, searcher.num_documents):
            raise QueryError(f"k={request.k} exceeds " + (f"the {searcher.num_documents} documents in the bundle"
                             if searcher.num_documents <= limits.max_k else f"this server's limit {limits.max_k}"))
        fusion = None
        if request.hybrid is True:
            fusion = Fusion()
        elif request.hybrid is not False:
            fusion = Fusion(**request.hybrid.model_dump())
        if fusion is not None and texts is None:
            raise QueryError("hybrid needs the query texts ('queries') for BM25")
        if fusion is not None and searcher.hybrid_unavailable:
            raise QueryError(searcher.hybrid_unavailable)  # before encoding: no BM25 index, or no PyStemmer
        embeddings = np.asarray(vectors, np.float32) if vectors is not None else self.encode(texts)
        if vectors is not None and embeddings.shape[1] != searcher.input_dim:
            raise QueryError(f"vectors: dimension {embeddings.shape[1]} != the bundle's input dim "
                             f"{searcher.input_dim}")
        rows, scores = searcher.search_rows(embeddings, request.k, hybrid=fusion, query_texts=texts)
        with_documents = request.documents and searcher.has_documents
        documents = searcher.documents(rows) if with_documents else None
        results = []
        for q in range(count):
            hits = []
            for rank, (row, score) in enumerate(zip(rows[q].tolist(), scores[q].tolist()), start=1):
                if row < 0:
                    continue  # a slot with no document is left out, never reported as one
                hit = {"rank": rank, "id": searcher.ids[row], "score": score}
                if documents is not None:
                    hit["document"] = documents[q * rows.shape[1] + rank - 1]
                hits.append(hit)
            results.append({"query": texts[q] if texts is not None else q, "hits": hits})
        return {"k": request.k, "hybrid": fusion is not None, "results": results}


def _request_models():
    """The pydantic models of a search request (built lazily: pydantic is imported with the server only)."""
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

    class HybridOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        k_rrf: float = Field(60.0, ge=0)
        dense_weight: float = Field(1.0, ge=0)
        bm25_weight: float = Field(1.0, ge=0)
        depth: StrictInt = Field(100, ge=1, le=10_000)

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        queries: str | list[str] | None = None
        vectors: list[float] | list[list[float]] | None = None
        k: StrictInt = Field(10, ge=1)
        hybrid: StrictBool | HybridOptions = False
        documents: StrictBool = True

    return SearchRequest


# The union branches' type tags pydantic puts in error locations ("list[float]" too): not fields of the request.
_TYPE_TAGS = {"str", "bool", "int", "float", "HybridOptions"}


def _describe_validation(errors: list[dict]) -> tuple[str, list[dict]]:
    """pydantic's errors as one line (the most specific: the deepest field) and a list of {"field", "message"}."""
    out = []
    for error in errors:
        path = [p for p in error.get("loc", ()) if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
        field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))
        out.append({"field": field or "body", "message": error.get("msg", "invalid"), "depth": len(path)})
    unique = list({(e["field"], e["message"]): e for e in out}.values())
    first = max(unique, key=lambda e: e["depth"])  # max keeps the first of equals: pydantic's order
    return f"{first['field']}: {first['message']}", [{"field": e["field"], "message": e["message"]} for e in unique]


def create_app(service: Service):
    """The FastAPI application over `service` (which may still be loading)."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    search_request = _request_models()
    app = FastAPI(title="esep-jax search", docs_url=None, redoc_url=None, openapi_url=None)

    def answer(status: int, payload: dict) -> Response:
        return Response(json.dumps(payload, allow_nan=False), status_code=status, media_type="application/json")

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):  # 404, 405: JSON like every other error
        return answer(error.status_code, {"error": str(error.detail)})

    @app.exception_handler(Exception)
    async def internal_error(_request, error: Exception):
        LOG.exception("internal error")
        return answer(500, {"error": "internal error (see the server's log)"})

    @app.get("/health")
    def health():
        return answer(200, {"status": "ok"})

    @app.get("/ready")
    def ready():
        if not service.ready:
            return answer(503, {"ready": False, "status": "loading the bundle", "bundle": str(service.bundle)})
        return answer(200, service.describe())

    @app.post("/search")
    async def search(request: Request):
        if not service.ready:
            return answer(503, {"error": "the bundle is still loading; retry when /ready answers 200"})
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return answer(400, {"error": f"malformed JSON: {error}"})
        if not isinstance(payload, dict):
            return answer(422, {"error": f"body: expected a JSON object, got {type(payload).__name__}"})
        try:
            parsed = search_request.model_validate(payload)
        except ValidationError as error:
            message, details = _describe_validation(error.errors(include_url=False, include_input=False))
            return answer(422, {"error": message, "errors": details})
        try:
            return answer(200, await run_in_threadpool(service.search, parsed))
        except QueryError as error:
            return answer(422, {"error": str(error)})

    return _BodyLimit(app, service.limits.max_body_bytes)


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before it is all read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body declares no length
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); an InputError if it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}", field="--host/--port") from None
    sock.set_inheritable(True)
    return sock


def serve(bundle: str, host: str = "127.0.0.1", port: int = 8000, key: bytes | None = None,
          limits: Limits = Limits(), access_log: bool = False, announce=print) -> None:
    """Runs the service until SIGINT/SIGTERM. Listens first (so /health answers), loads the bundle in a thread,
    and stops with the loading error (raised here) if the bundle cannot be served."""
    import uvicorn

    service = Service(bundle, key, limits)
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=access_log,
                                           timeout_graceful_shutdown=10))
    address = sock.getsockname()
    announce(f"esep-jax serve: listening on http://{host if ':' not in host else f'[{host}]'}:{address[1]} "
             f"(loading {bundle})")

    def stop():
        server.should_exit = True

    threading.Thread(target=service.load, args=(stop,), name="load-bundle", daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the previous handler; with
    # this one that ends here and the process exits 0, as a service stopped on request should.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        server.run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if isinstance(service.error, ImportError):  # scann missing on this host: say so in one line
        raise InputError(f"cannot load the bundle: {service.error}", file=str(bundle))
    if service.error is not None:
        raise service.error
