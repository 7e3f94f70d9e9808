"""Search-R1 compatible retrieval server (FastAPI).

- `POST /retrieve` `{"queries": [str, ...], "topk": int, "return_scores": bool}` ->
  `{"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}`; without scores each entry is the
  bare document `{"id", "contents"}`. `topk` defaults to `retrieval.top_k`. An empty query list gives
  `{"result": []}`. Limits (`retrieval.max_queries`, `max_query_chars`, `1 <= topk <= max_top_k`) answer 422.
- `GET /health`: the index card. `GET /stats`: micro-batching counters.

Micro-batching: requests are queued; one worker searches everything queued as one batch (one encoder forward,
one index search), then answers each request with its own slice. Requests that arrive while a batch is being
searched form the next batch. After answering a batch of n requests the worker waits up to
`retrieval.batch_wait_ms` for n more to arrive (the clients it just answered usually send their next request at
once), so concurrent clients converge to one shared batch instead of alternating half-size ones. A lone
sequential client is never delayed by this: the request the worker waits for is its own next one.

Connections (`serve`, `server_config`; the CLI uses them): a connection must deliver a request's headers within
`retrieval.header_timeout_s` of opening (or of starting its next request) and the body within
`retrieval.body_timeout_s` of the headers, else it is closed. At most `retrieval.max_connections` are open, fewer
when the process's open-file limit (RLIMIT_NOFILE, raised towards its hard limit by the CLI) leaves less room after
the process's own files and one accept burst, so accepting never fails with "Too many open files". At the cap a new
connection closes the longest-idle one (waiting for a request: headers not complete, or keep-alive), so idle or
stalled clients can never lock out `/health`; when every connection is busy with a request it gets a 503. Each kind
of event (timeouts, closed or refused connections, clients gone mid-body) logs at most one line per 10 s, with a
count of those not logged; the totals are in `/stats` under `connections`.

There is no authentication and no TLS. The CLI binds 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

from tspo_core.config import RetrievalConfig
from tspo_core.errors import TSPOError, cut
from tspo_core.omp import choose_wait_policy
from tspo_core.retrieval.base import Hit, RetrievalError, Retriever
from tspo_core.retrieval.retriever import passages_to_json

log = logging.getLogger(__name__)

try:  # faster replies when orjson is installed (it usually is, via FastAPI/Prefect dependencies)
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class ServerLimits:
    """Request limits and batching settings (from `RetrievalConfig`)."""

    max_queries: int = 512
    max_query_chars: int = 2048
    max_top_k: int = 100
    default_top_k: int = 3
    batch_wait_ms: float = 2.0
    max_batch_queries: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000

    @classmethod
    def from_config(cls, cfg: RetrievalConfig) -> "ServerLimits":
        return cls(max_queries=cfg.max_queries, max_query_chars=cfg.max_query_chars, max_top_k=cfg.max_top_k,
                   default_top_k=min(cfg.top_k, cfg.max_top_k), batch_wait_ms=cfg.batch_wait_ms,
                   max_batch_queries=cfg.max_batch_queries, header_timeout_s=cfg.header_timeout_s,
                   body_timeout_s=cfg.body_timeout_s, max_connections=cfg.max_connections)

    @property
    def max_body_bytes(self) -> int:
        # every query at its longest, 6 bytes per escaped character, plus JSON punctuation
        return self.max_queries * (self.max_query_chars * 6 + 8) + 64 * 1024


class _Throttled:
    """Logs one line per `interval_s` for one kind of event; the events in between are counted into the next line."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s, self._last, self._skipped = interval_s, float("-inf"), 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._skipped += 1
            return
        if self._skipped:
            msg += f" ({self._skipped} more like it not logged since the last such line)"
        self._last, self._skipped = now, 0
        log.warning(msg, *args)


class ServerEvents:
    """Connection-level counters (served under `/stats` -> `connections`) and their throttled log lines."""

    def __init__(self) -> None:
        self.counts = {"header_timeouts": 0, "body_timeouts": 0, "closed_idle_at_cap": 0, "refused_at_cap": 0,
                       "client_gone_mid_body": 0, "open": 0, "cap": None}
        self.timeouts, self.at_cap, self.gone = _Throttled(), _Throttled(), _Throttled()


class RetrieveRequest(BaseModel):
    """The Search-R1 request body (unknown keys are ignored, as their server does)."""

    model_config = ConfigDict(extra="ignore")
    queries: list[StrictStr]
    topk: StrictInt | None = None
    return_scores: StrictBool = False


@dataclass
class _Job:
    queries: list[str]
    top_k: int
    future: asyncio.Future


class MicroBatcher:
    """Greedy micro-batching of concurrent searches on one worker thread (see the module docstring)."""

    def __init__(self, retriever: Retriever, limits: ServerLimits):
        self.retriever, self.limits = retriever, limits
        self._pending: deque[_Job] = deque()
        self._running = False
        self._task: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None  # set whenever a request is queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")
        self.stats = {"requests": 0, "queries": 0, "batches": 0, "largest_batch_requests": 0,
                      "largest_batch_queries": 0, "errors": 0}

    async def submit(self, queries: list[str], top_k: int) -> list[list[Hit]]:
        loop = asyncio.get_running_loop()
        job = _Job(queries, top_k, loop.create_future())
        self._pending.append(job)
        if self._arrived is not None:
            self._arrived.set()
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())
        return await job.future

    def _take(self) -> list[_Job]:
        jobs = [self._pending.popleft()]
        n = len(jobs[0].queries)
        while self._pending and n + len(self._pending[0].queries) <= self.limits.max_batch_queries:
            n += len(self._pending[0].queries)
            jobs.append(self._pending.popleft())
        return jobs

    async def _gather(self, expected: int) -> None:
        """Wait (at most `batch_wait_ms`) until `expected` more requests are queued, or the batch is full."""
        if self._arrived is None:
            self._arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        target = len(self._pending) + expected
        deadline = loop.time() + self.limits.batch_wait_ms / 1000.0
        while len(self._pending) < target and \
                sum(len(j.queries) for j in self._pending) < self.limits.max_batch_queries:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        answered = 0  # requests answered by the previous batch: their clients may be about to send again
        try:
            while True:
                if answered and self.limits.batch_wait_ms > 0:
                    await self._gather(answered)
                if not self._pending:
                    break
                await asyncio.sleep(0)  # let requests already received join
                jobs = [j for j in self._take() if not j.future.done()]  # done: the client went away
                answered = len(jobs)
                if not jobs:
                    continue
                queries = [q for j in jobs for q in j.queries]
                top_k = max(j.top_k for j in jobs)
                self.stats["batches"] += 1
                self.stats["requests"] += len(jobs)
                self.stats["queries"] += len(queries)
                self.stats["largest_batch_requests"] = max(self.stats["largest_batch_requests"], len(jobs))
                self.stats["largest_batch_queries"] = max(self.stats["largest_batch_queries"], len(queries))
                try:
                    results = await loop.run_in_executor(self._executor, self.retriever.search_with_scores,
                                                         queries, top_k)
                    if len(results) != len(queries):
                        raise RetrievalError(f"retriever returned {len(results)} result lists for "
                                             f"{len(queries)} queries")
                except Exception as err:  # every waiting request gets the error; the worker carries on
                    self.stats["errors"] += 1
                    log.exception("search failed for a batch of %d queries", len(queries))
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(err)
                    continue
                pos = 0
                for j in jobs:
                    part = results[pos:pos + len(j.queries)]
                    pos += len(j.queries)
                    if not j.future.done():
                        j.future.set_result([hits[:j.top_k] for hits in part])
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_app(retriever: Retriever, card: dict[str, Any] | None = None,
               limits: ServerLimits | RetrievalConfig | None = None) -> Any:
    """The FastAPI app serving `retriever` (see the module docstring). `card` is what `/health` returns (default:
    `retriever.card`); `limits` a `ServerLimits` or a `RetrievalConfig` (default: `RetrievalConfig()`'s)."""
    if limits is None:
        limits = ServerLimits.from_config(RetrievalConfig())
    elif isinstance(limits, RetrievalConfig):
        limits = ServerLimits.from_config(limits)
    card = dict(card if card is not None else getattr(retriever, "card", {}) or {})
    batcher = MicroBatcher(retriever, limits)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(title="TSPO retrieval server (Search-R1 API)", lifespan=lifespan,
                  description="No authentication: keep it on loopback or a private network.")
    events = ServerEvents()
    app.state.batcher, app.state.limits, app.state.retriever, app.state.events = batcher, limits, retriever, events
    max_body = limits.max_body_bytes

    def reply(obj: Any, status: int = 200) -> Response:
        return Response(_dumps(obj), status_code=status, media_type="application/json")

    def reject(msg: str) -> Response:
        return reply({"detail": msg}, 422)

    # The body is read and validated here rather than by a FastAPI body parameter: pydantic's JSON parser is
    # strict and fast, the size cap applies while reading, and an error reply never echoes the input (FastAPI's
    # default would, and 1e400 -> inf is not JSON-encodable). The schema still appears in the OpenAPI docs.
    @app.post("/retrieve", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": RetrieveRequest.model_json_schema()}}}})
    async def retrieve(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return reply({"detail": f"request body over {max_body} bytes" if length.isdigit()
                          else "invalid Content-Length"}, 413 if length.isdigit() else 400)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    return reply({"detail": f"request body over {max_body} bytes"}, 413)
                chunks.append(chunk)
        except ClientDisconnect:  # one line, not a traceback: nothing is left to answer
            events.counts["client_gone_mid_body"] += 1
            client = request.client
            events.gone.warning("request body from %s ended after %d of %s bytes: %s",
                                f"{client.host}:{client.port}" if client else "?", size, length or "?",
                                request.scope.get(_CLOSED_BECAUSE, "the client closed the connection"))
            return Response(status_code=400)
        try:
            req = RetrieveRequest.model_validate_json(b"".join(chunks))
        except ValidationError as err:
            return reply({"detail": [{"type": e["type"], "loc": [p if isinstance(p, int) else str(p)
                                                                 for p in e["loc"]], "msg": e["msg"]}
                                     for e in err.errors(include_url=False)]}, 422)
        top_k = limits.default_top_k if req.topk is None else req.topk
        if not 1 <= top_k <= limits.max_top_k:
            return reject(f"topk must be between 1 and {limits.max_top_k}, got {top_k}")
        if len(req.queries) > limits.max_queries:
            return reject(f"{len(req.queries)} queries in one request; the limit is {limits.max_queries}")
        for i, q in enumerate(req.queries):
            if len(q) > limits.max_query_chars:
                return reject(f"query {i} has {len(q)} characters; the limit is {limits.max_query_chars}")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:
                return reject(f"query {i} is not valid Unicode text (lone surrogate)")
        if not req.queries:
            return reply({"result": []})
        try:
            hits = await batcher.submit(req.queries, top_k)
        except Exception as err:
            return reply({"detail": f"retrieval failed: {type(err).__name__}: {err}"}, 500)
        return reply({"result": [passages_to_json(h, req.return_scores) for h in hits]})

    @app.get("/health")
    async def health() -> Response:
        return reply(card)

    @app.get("/stats")
    async def stats() -> Response:
        return reply({**batcher.stats, "connections": dict(events.counts)})

    return app


# ----------------------------------------------------------------------------------------------------------------
# connections: read timeouts, a cap below the open-file limit
# ----------------------------------------------------------------------------------------------------------------
ACCEPT_BACKLOG = 128
"""Listen backlog, which is also the most connections asyncio accepts in one go before any of them is seen."""
FD_RESERVE = 64
"""Open files kept free for the process itself (index and corpus files, logs, threads) beside the connections."""
_CLOSED_BECAUSE = "tspo.closed_because"  # scope key: why the server closed a connection mid-request


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE (None: unlimited or unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit(wanted: int) -> int | None:
    """Raise the soft RLIMIT_NOFILE to `wanted` where the hard limit allows (never lowers it); returns the new soft
    limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as err:  # pragma: no cover - the limit stays as it was
        log.debug("could not raise the open-file limit: %s", err)
    return open_file_limit()


def _files_open() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no procfs
        return FD_RESERVE


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered so that the open connections, one accept burst (`ACCEPT_BACKLOG`), the files
    open now and `FD_RESERVE` stay under the soft open-file limit. Raises `RetrievalError` when no room is left."""
    soft = open_file_limit()
    if soft is None:
        return max_connections
    room = soft - _files_open() - ACCEPT_BACKLOG - FD_RESERVE
    if room < 1:
        raise RetrievalError(f"the open-file limit ({soft}, ulimit -n) leaves no room for client connections; "
                             f"raise it above {soft - room + 64}")
    if room < max_connections:
        log.warning("retrieval.max_connections = %d lowered to %d by the open-file limit (%d, ulimit -n)",
                    max_connections, room, soft)
    return min(max_connections, room)


_BUSY = json.dumps({"detail": "every connection of the server is busy; retry later"}).encode()
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
                  + str(len(_BUSY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BUSY)


class ConnectionGuard:
    """The connections of one server: their read deadlines, the cap, the choice of whom to close at the cap."""

    def __init__(self, limits: ServerLimits, cap: int, events: ServerEvents):
        self.limits, self.cap, self.events = limits, cap, events
        self.open: dict[Any, None] = {}
        events.counts["cap"] = cap

    def opened(self, conn: Any) -> bool:
        """Admit `conn`; at the cap close the longest-idle other connection, or refuse `conn` (False) with a 503
        when none is idle."""
        self.open[conn] = None
        self.events.counts["open"] = len(self.open)
        if len(self.open) <= self.cap:
            return True
        idle = [c for c in self.open if c is not conn and c.idle_since is not None]
        if idle:
            victim = min(idle, key=lambda c: c.idle_since)
            self.open.pop(victim, None)
            self.events.counts["open"] = len(self.open)
            self.events.counts["closed_idle_at_cap"] += 1
            self.events.at_cap.warning("%d connections open (the cap): closed the longest-idle one", self.cap)
            victim.close_connection()
            return True
        self.open.pop(conn, None)
        self.events.counts["open"] = len(self.open)
        self.events.counts["refused_at_cap"] += 1
        self.events.at_cap.warning("%d connections open (the cap), all busy: refused a new one with 503", self.cap)
        conn.transport.write(_BUSY_RESPONSE)
        conn.transport.close()
        return False

    def closed(self, conn: Any) -> None:
        self.open.pop(conn, None)
        self.events.counts["open"] = len(self.open)

    def protocol_class(self) -> type:
        """uvicorn's h11 protocol with this guard's deadlines and cap."""
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        guard = self

        class GuardedH11Protocol(H11Protocol):
            # phase: "headers" (waiting for a request's headers; deadline header_timeout_s), "body" (headers in,
            # body not complete; deadline body_timeout_s), "keepalive" (idle after a response; uvicorn's own
            # keep-alive timeout applies) or "busy" (the request is complete: the server's turn, no deadline)
            phase: str = "busy"
            idle_since: float | None = None  # set while waiting for the client (headers or keep-alive)
            _deadline: asyncio.TimerHandle | None = None

            def connection_made(self, transport: Any) -> None:  # type: ignore[override]
                super().connection_made(transport)
                self._enter("headers")
                if not guard.opened(self):
                    self._enter("busy")

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                self._follow()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self._follow()

            def connection_lost(self, exc: Exception | None) -> None:
                self._enter("busy")
                guard.closed(self)
                super().connection_lost(exc)

            def close_connection(self) -> None:
                self._enter("busy")
                if not self.transport.is_closing():
                    self.transport.close()

            def _follow(self) -> None:
                if self.transport.is_closing():
                    self._enter("busy")
                    return
                state = self.conn.their_state
                if state is h11.IDLE:
                    buffered = bool(self.conn.trailing_data[0])
                    self._enter("keepalive" if self.timeout_keep_alive_task is not None and not buffered
                                else "headers")
                elif state is h11.SEND_BODY:
                    self._enter("body")
                else:
                    self._enter("busy")

            def _enter(self, phase: str) -> None:
                if phase == self.phase and phase != "busy":
                    return  # a deadline runs from the start of its phase, not from the last byte
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None
                self.phase = phase
                self.idle_since = time.monotonic() if phase in ("headers", "keepalive") else None
                timeout = {"headers": guard.limits.header_timeout_s, "body": guard.limits.body_timeout_s}.get(phase)
                if timeout is not None:
                    self._deadline = self.loop.call_later(timeout, self._expired)

            def _expired(self) -> None:
                self._deadline = None
                if self.transport.is_closing():
                    return
                who = "%s:%d" % self.client if self.client else "?"
                if self.phase == "headers":
                    guard.events.counts["header_timeouts"] += 1
                    guard.events.timeouts.warning("closed the connection of %s: no complete request headers "
                                                  "within %gs", who, guard.limits.header_timeout_s)
                elif self.phase == "body":  # the request handler logs the line when it sees the body end
                    guard.events.counts["body_timeouts"] += 1
                    if self.scope is not None:
                        self.scope[_CLOSED_BECAUSE] = (f"closed by the server: body not complete within "
                                                       f"{guard.limits.body_timeout_s:g}s")
                self.close_connection()

        return GuardedH11Protocol


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  access_log: bool = False) -> Any:
    """The `uvicorn.Config` serving `app` (from `create_app`) with its limits' read deadlines and connection cap
    (see the module docstring)."""
    import uvicorn

    limits: ServerLimits = app.state.limits
    guard = ConnectionGuard(limits, connection_cap(limits.max_connections), app.state.events)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          http=guard.protocol_class(), backlog=ACCEPT_BACKLOG)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {cut(text, 40)!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 to 65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    defaults = RetrievalConfig()
    p = argparse.ArgumentParser(
        prog="python -m tspo_core.retrieval.server",
        description="Serve a built index over the Search-R1 retrieval API: POST /retrieve {queries, topk, "
                    "return_scores}; GET /health returns the index card. WARNING: the server has NO "
                    "AUTHENTICATION and no TLS; anyone who can reach the port can query it. It binds 127.0.0.1 "
                    "by default; bind another address only on a trusted private network.")
    p.add_argument("--index", required=True, help="Index directory written by build_index (holds index_card.json).")
    p.add_argument("--host", default=None, help=f"Bind address (default {defaults.host}, loopback only).")
    p.add_argument("--port", type=_port, default=None, help=f"Port (default {defaults.port}).")
    p.add_argument("--params", default=None, help="params.yaml to read the `retrieval:` limits and batching "
                   "settings from (default: built-in defaults).")
    p.add_argument("--device", default=None, help="Query encoder device: auto, cpu, cuda (dense indexes).")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="Log every request (off by default: it costs "
                   "throughput).")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 2 with one `error:` line for bad input (params, index, options), 1 with one line for anything
    else (the traceback with `--log-level debug`), 0 after a clean shutdown."""
    # Idle OpenMP threads sleep instead of spinning. On a CPU shared with other busy processes, spinning torch
    # threads wait on descheduled siblings: measured on the 2-core test machine under load, one query took
    # ~300 ms with the default policy and ~10 ms with PASSIVE. Only effective before torch is first imported;
    # `OMP_WAIT_POLICY=default` asks for OpenMP's own policy (tspo_core.omp).
    choose_wait_policy("PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _serve(args)
    except TSPOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line, not a traceback (unless debugging)
        if args.log_level == "debug":
            traceback.print_exc()
        print(f"error: internal error: {type(err).__name__}: {cut(str(err))} (--log-level debug shows the "
              "traceback)", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    if args.params:
        from tspo_core.config import load_params

        cfg = load_params(args.params).retrieval
    else:
        cfg = RetrievalConfig()
    host = args.host or cfg.host
    port = cfg.port if args.port is None else args.port
    if not _is_loopback(host):
        log.warning("binding %s: this server has no authentication; make sure the network is trusted", host)
    raise_open_file_limit(cfg.max_connections + _files_open() + ACCEPT_BACKLOG + FD_RESERVE + 256)

    import uvicorn

    from tspo_core.retrieval.retriever import load_retriever

    retriever = load_retriever(args.index, device=args.device)
    try:
        app = create_app(retriever, getattr(retriever, "card", None), cfg)
        config = server_config(app, host, port, args.log_level, args.access_log)
        log.info("serving %s (%s, %s passages) on http://%s:%d", args.index, retriever.card.get("index_type"),
                 retriever.card.get("num_passages"), host, port)
        uvicorn.Server(config).run()
    finally:
        retriever.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
