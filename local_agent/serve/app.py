"""The HTTP surface of `backrest-relay serve` (starlette + uvicorn, Prometheus metrics).

Routes parse and answer; `security` decides what may run, `runs` runs it. Every route but
/healthz needs the token.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from cloud.integrations.redact import REDACTOR
from local_agent.config import RelayConfig
from local_agent.errors import ExitCode
from local_agent.serve.runs import ChildLauncher, Launcher, QueueFull, Run, RunQueue
from local_agent.serve.security import (
    Refused,
    check_token,
    is_loopback,
    is_loopback_host,
    parse_trigger,
    resolve_target,
)

log = logging.getLogger("backrest_relay.serve")

OUTCOMES = {int(code): code.name.lower() for code in ExitCode}


class _LastVerified(Collector):
    """Last verified time per repository, read from the run store at scrape time."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "backrest_relay_last_verified_timestamp_seconds",
            "When the repository's off-site copy was last verified (Unix time).",
            labels=["repo", "repo_id"],
        )
        for key, repo_id, when in _verified_times(self.config):
            family.add_metric([key, repo_id or ""], when)
        yield family


def _verified_times(config: RelayConfig) -> list[tuple[str, str | None, float]]:
    from cloud.integrations.runstore_sqlite import RunStoreError, SqliteRunStore
    from local_agent.events.pipeline import run_store_path

    path = run_store_path(config.state.path())
    if not path.exists():
        return []
    try:
        store = SqliteRunStore(path)
    except RunStoreError as exc:
        # The other metrics still tell the scraper about the queue and the runs.
        log.warning("metrics: no verified times: %s", exc)
        return []
    try:
        return [
            (status.repo_key, status.repo_id, status.latest_verified.finished_at.timestamp())
            for status in store.repos()
            if status.latest_verified is not None
        ]
    finally:
        store.close()


class Metrics:
    def __init__(self, config: RelayConfig, queue_depth: Any, in_progress: Any) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "backrest_relay_runs", "Runs finished, by outcome.", ["outcome"], registry=self.registry
        )
        self.joined = Counter(
            "backrest_relay_triggers_joined",
            "Triggers that joined a run already queued or in progress.",
            registry=self.registry,
        )
        self.refused = Counter(
            "backrest_relay_requests_refused",
            "Requests answered 4xx without running anything, by status.",
            ["status"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "backrest_relay_uploaded_bytes", "Bytes uploaded by runs.", registry=self.registry
        )
        self.objects = Counter(
            "backrest_relay_uploaded_objects", "Objects uploaded by runs.", registry=self.registry
        )
        depth = Gauge("backrest_relay_queue_depth", "Runs waiting.", registry=self.registry)
        depth.set_function(queue_depth)
        running = Gauge(
            "backrest_relay_runs_in_progress", "Runs in progress.", registry=self.registry
        )
        running.set_function(in_progress)
        self.registry.register(_LastVerified(config))

    def finished(self, run: Run) -> None:
        self.runs.labels(OUTCOMES.get(run.exit_code or 0, "unexpected")).inc()
        summary = run.summary or {}
        self.bytes.inc(max(int(summary.get("uploaded_bytes") or 0), 0))
        self.objects.inc(max(int(summary.get("uploaded_files") or 0), 0))


def create_app(
    config: RelayConfig,
    *,
    config_path: Path | None,
    token: str,
    launcher: Launcher | None = None,
) -> Starlette:
    serve = config.serve
    metrics: Metrics
    queue = RunQueue(
        launcher
        or ChildLauncher(config_path=config_path, deadline_seconds=config.upload.deadline_seconds),
        max_queue=serve.max_queue,
        max_parallel=serve.max_parallel,
        keep=serve.keep_runs,
        on_finish=lambda run: metrics.finished(run),
    )
    metrics = Metrics(config, lambda: queue.queue_depth, lambda: queue.in_progress)

    def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        metrics.refused.labels(str(status)).inc()
        log.warning("refused (%d): %s", status, message)
        return JSONResponse(
            {"error": REDACTOR(message), "exit_code": int(ExitCode.USAGE)},
            status_code=status,
            headers=headers,
        )

    def authorized(request: Request) -> bool:
        if not token and not is_loopback_host(request.headers.get("host", "")):
            return False  # no token: only names of this host (a rebound name is a web page)
        page = request.url.path == "/" and request.method in ("GET", "HEAD")
        return check_token(token, request.headers.get("authorization"), basic=page)

    def unauthorized(request: Request) -> Response:
        if not token:
            return refuse(403, "without a token only loopback names are served (Host header)")
        browser = request.url.path == "/"
        return refuse(
            401,
            "missing or wrong token (send Authorization: Bearer $BACKREST_RELAY_TOKEN)",
            {"WWW-Authenticate": 'Basic realm="backrest-relay"' if browser else "Bearer"},
        )

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (
            not declared.isdigit() or int(declared) > serve.max_body_bytes
        ):
            raise Refused(413, f"request body larger than serve.max_body ({serve.max_body})")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > serve.max_body_bytes:
                raise Refused(413, f"request body larger than serve.max_body ({serve.max_body})")
        return body

    async def post_run(request: Request) -> Response:
        if not authorized(request):
            return unauthorized(request)
        if "origin" in request.headers:
            # Browsers send Origin with every POST, the hook's curl never does: without a
            # token (loopback) any page the host's browser opens could post here otherwise.
            return refuse(403, "requests from web pages are refused (no Origin header, please)")
        wait = request.query_params.get("wait", "true").lower() not in ("false", "0", "no")
        try:
            try:
                body = await read_body(request)
            except ClientDisconnect:  # the hook was stopped while sending: routine
                log.info("caller hung up before its request was complete: nothing run")
                return Response(status_code=400)
            trigger = parse_trigger(body, request.headers.get("content-type", ""))
            target = await run_in_threadpool(resolve_target, trigger, config)
            run, joined = queue.submit(target, trigger)
        except Refused as exc:
            return refuse(exc.status, exc.message)
        except QueueFull as exc:
            return refuse(429, f"queue full: {exc}", {"Retry-After": "60"})
        if joined:
            metrics.joined.inc()
        log.info(
            "trigger %s for %s: %s run %s",
            trigger.event,
            target.repo_id,
            "joined" if joined else "queued",
            run.id,
        )
        if not wait:
            return JSONResponse({**run.public(), "joined": joined}, status_code=202)
        return StreamingResponse(
            _stream(run, _opening(queue, run, joined)),
            media_type="text/plain; charset=utf-8",
            headers={"X-Run-Id": run.id, "Cache-Control": "no-store"},
        )

    async def get_run(request: Request) -> Response:
        if not authorized(request):
            return unauthorized(request)
        run = queue.get(request.path_params["run_id"])
        if run is None:
            return JSONResponse({"error": "no such run (finished runs are kept for a while)"}, 404)
        if request.query_params.get("follow", "").lower() in ("true", "1", "yes"):
            return StreamingResponse(
                _stream(run, f"backrest-relay: following run {run.id} ({run.state})\n"),
                media_type="text/plain; charset=utf-8",
                headers={"X-Run-Id": run.id, "Cache-Control": "no-store"},
            )
        return JSONResponse(run.public())

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {"ok": True, "queue_depth": queue.queue_depth, "in_progress": queue.in_progress}
        )

    async def metrics_route(request: Request) -> Response:
        if not authorized(request):
            return unauthorized(request)
        body = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def status_page(request: Request) -> Response:
        from cloud.integrations.runstore_sqlite import RunStoreError

        if not authorized(request):
            return unauthorized(request)
        try:
            page = await run_in_threadpool(_report, config)
        except RunStoreError as exc:
            log.warning("status page: %s", exc)
            return PlainTextResponse(f"backrest-relay: {exc}\n", status_code=503)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app = Starlette(
        routes=[
            Route("/v1/runs", post_run, methods=["POST"]),
            Route("/v1/runs/{run_id}", get_run, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/", status_page, methods=["GET"]),
        ],
        lifespan=lambda app: _lifespan(queue),
    )
    app.state.queue = queue
    return app


@contextlib.asynccontextmanager
async def _lifespan(queue: RunQueue) -> AsyncIterator[None]:
    yield
    await queue.close()  # ends the children: a run stopped here resumes on the next trigger


def _opening(queue: RunQueue, run: Run, joined: bool) -> str:
    what = f"run {run.id} ({run.kind} of {run.target.repo_id})"
    if joined:
        return f"backrest-relay: joined {what}, {run.state}\n"
    ahead = queue.position(run) if run.state == "queued" else 0
    return f"backrest-relay: {what} " + (f"queued behind {ahead}\n" if ahead else "started\n")


async def _stream(run: Run, opening: str) -> AsyncIterator[bytes]:
    """The run's lines for one caller; a caller leaving does not touch the run."""
    yield opening.encode()
    async for line in run.follow():
        yield line.encode("utf-8", errors="replace")


def _report(config: RelayConfig) -> str:
    from cloud.integrations.runstore_sqlite import SqliteRunStore
    from local_agent.events.pipeline import run_store_path
    from local_agent.report.html_report import render_report

    path = run_store_path(config.state.path())
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteRunStore(path)
    try:
        page = render_report(store)
    finally:
        store.close()
    # The same page as `status --html`, reloading itself: a tab left open stays current.
    return page.replace("<head>", '<head><meta http-equiv="refresh" content="60">', 1)


def serve(config: RelayConfig, *, config_path: Path | None, listen: str, token: str) -> int:
    """Run until SIGTERM/SIGINT. Refuses to listen beyond loopback without a token."""
    import uvicorn

    from local_agent.errors import ConfigError

    if not token and not is_loopback(listen):
        raise ConfigError(
            f"serve: refusing to listen on {listen} without a token: set BACKREST_RELAY_TOKEN "
            "(or [serve] token), or listen on 127.0.0.1"
        )
    if not config.serve.roots:
        raise ConfigError(
            "serve: no [serve] roots: name the directories repositories may live in "
            '(e.g. roots = ["/repos"], or BACKREST_RELAY_SERVE__ROOTS)'
        )
    host, _, port = listen.rpartition(":")
    app = create_app(config, config_path=config_path, token=token)
    queue: RunQueue = app.state.queue

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # Stop the runs first: their streams then end with a final line, and uvicorn
            # need not cancel them mid-stream (a traceback per caller) after its timeout.
            await queue.close()
            await super().shutdown(sockets)

    log.info("listening on %s (token %s)", listen, "required" if token else "not required")
    server = Server(
        uvicorn.Config(
            app,
            host=host.strip("[]"),
            port=int(port),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            proxy_headers=False,
            server_header=False,
        )
    )
    server.run()
    return 0
