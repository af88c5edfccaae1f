"""The page: an ASGI app (Starlette) over the agent's operations.

Every route but the login needs a session (logs can hold secrets).  A
session comes from a one-time URL that ``efci web-login`` prints; the agent
keeps only digests of tokens and sessions, so revoking them
(``efci web-logout --all``) takes effect at the next request.  Every
state-changing request must carry the session's CSRF token and come from
this page's own origin.  Every page is also JSON: under ``/api/`` or with
``Accept: application/json``.
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..client import RemoteError
from ..config import AgentConfig
from ..errors import AgentUnreachable
from ..logformat import Kind
from ..views import size
from .hooks import gitea_hook
from .link import AgentLink

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "efci_session"
MAX_BODY = 64 * 1024
MAX_QUERY = 4096

mimetypes.add_type("text/javascript", ".mjs")

# Headers on every answer: no inline script can run (CSP), nothing is
# cached or framed, no URL leaks in a Referer.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    # same-origin: no URL leaks to other sites, yet forms keep their Origin
    # (no-referrer makes Chromium send "Origin: null" on a form post).
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}

_STATUS_OF_CODE = {"not_found": 404, "bad_request": 400, "conflict": 409, "refused": 401,
                   "config": 400, "unreachable": 503, "state_unwritable": 503}


class Refusal(Exception):
    """An HTTP error with a message for a person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Session:
    def __init__(self, token: str, csrf: str, uid: int) -> None:
        self.token, self.csrf, self.uid = token, csrf, uid


class Web:
    def __init__(self, cfg: AgentConfig, link: AgentLink) -> None:
        self.cfg = cfg
        self.link = link
        url = urllib.parse.urlsplit(cfg.web_url)
        host, port = cfg.web_listen
        self.origins = {f"{url.scheme}://{url.netloc}", f"http://{host}:{port}",
                        f"http://localhost:{port}"}
        self.hosts = {urllib.parse.urlsplit(o).netloc for o in self.origins}
        self.secure = url.scheme == "https"
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined)
        self.templates.filters["when"] = _when
        self.templates.filters["size"] = size

    # -- checks ------------------------------------------------------------------

    def check_host(self, request: Request) -> None:
        """DNS rebinding: a page of another site resolving to this address
        sends its own name as Host."""
        if request.headers.get("host", "") not in self.hosts:
            raise Refusal(421, "this page answers only to " + ", ".join(sorted(self.hosts))
                          + "; set web.public_url in agent.yml to the address browsers use")
        if len(request.url.query) > MAX_QUERY:
            raise Refusal(414, f"the query string is longer than {MAX_QUERY} bytes")

    def check_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is None or origin not in self.origins:
            raise Refusal(403, f"refused a request from origin {origin or '(none)'}: "
                               "changes are accepted only from this page itself")

    async def session(self, request: Request) -> Session:
        token = request.cookies.get(COOKIE)
        if not token:
            raise Refusal(401, "not logged in: run `efci web-login` on the host and open "
                               "the URL it prints")
        try:
            found = await self.link.call("web_session", session=token)
        except RemoteError as e:
            raise Refusal(401, e.message) from None
        return Session(token, found["csrf"], found["uid"])

    async def changing(self, request: Request) -> tuple[Session, dict[str, Any]]:
        """A state-changing request: origin, session and CSRF token checked;
        returns the session and the (bounded) form or JSON body."""
        self.check_origin(request)
        session = await self.session(request)
        body = await _read_body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/json":
            try:
                fields = json.loads(body or b"{}")
            except ValueError:
                raise Refusal(400, "the body is not JSON") from None
            if not isinstance(fields, dict):
                raise Refusal(400, "the body must be a JSON object")
        else:
            fields = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                                 keep_blank_values=True))
        given = request.headers.get("x-csrf-token") or str(fields.pop("csrf", ""))
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise Refusal(403, "the CSRF token is missing or wrong: reload the page")
        return session, fields

    # -- answers ------------------------------------------------------------------

    def page(self, request: Request, template: str, data: Any, session: Session,
             **context: Any) -> Response:
        if wants_json(request):
            return JSONResponse(data)
        html = self.templates.get_template(template).render(
            data=data, csrf=session.csrf, version=__version__, request=request, **context)
        return HTMLResponse(html)

    def done(self, request: Request, result: Any, where: str) -> Response:
        """After a change: JSON for scripts and the page's own fetches, a
        redirect for a plain form post."""
        if wants_json(request) or request.headers.get("x-csrf-token"):
            return JSONResponse(result)
        return RedirectResponse(where, status_code=303)

    def refusal(self, request: Request, status: int, message: str) -> Response:
        if wants_json(request) or request.url.path.endswith(("/log", "/raw")):
            return JSONResponse({"error": message, "status": status}, status_code=status)
        html = self.templates.get_template("error.html").render(
            status=status, message=message, version=__version__)
        return HTMLResponse(html, status_code=status)


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or \
        "application/json" in request.headers.get("accept", "")


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise Refusal(413, f"the request body is larger than {MAX_BODY} bytes")
    return bytes(body)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _run_id(request: Request) -> int:
    text = request.path_params["run"]
    if not text.isdigit() or len(text) > 18:
        raise Refusal(400, f"{text[:40]!r} is not a run number")
    return int(text)


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 18:
        raise Refusal(400, f"{name} must be a number, not {text[:40]!r}")
    return int(text)


# -- the routes -----------------------------------------------------------------------

Handler = Callable[[Web, Request], Awaitable[Response]]


async def runs_page(web: Web, request: Request) -> Response:
    session = await web.session(request)
    q = request.query_params
    filters = {k: q.get(k) or None for k in ("task", "status", "owner")}
    found = await web.link.call("runs", limit=min(_int(request, "limit", 50) or 50, 1000),
                                **filters)
    if request.query_params.get("fragment") == "rows":
        return HTMLResponse(web.templates.get_template("runs_rows.html").render(runs=found))
    tasks = await web.link.call("tasks")
    return web.page(request, "runs.html", found, session, filters=filters,
                    tasks=sorted(t["name"] for t in tasks))


async def run_page(web: Web, request: Request) -> Response:
    session = await web.session(request)
    found = await web.link.call("show", run=_run_id(request))
    return web.page(request, "run.html", found, session, run=found)


async def tasks_page(web: Web, request: Request) -> Response:
    session = await web.session(request)
    tasks = await web.link.call("tasks")
    latest: dict[str, Any] = {}
    for run in await web.link.call("runs", limit=1000):
        latest.setdefault(run["task"], run)
    data = [{**t, "last_run": latest.get(t["name"])} for t in tasks]
    return web.page(request, "tasks.html", data, session)


async def keys_page(web: Web, request: Request) -> Response:
    session = await web.session(request)
    return web.page(request, "keys.html", await web.link.call("key_list"), session)


async def images_page(web: Web, request: Request) -> Response:
    session = await web.session(request)
    return web.page(request, "images.html", await web.link.call("images"), session)


async def caches_page(web: Web, request: Request) -> Response:
    session = await web.session(request)
    return web.page(request, "caches.html", await web.link.call("cache_ls"), session)


async def run_start(web: Web, request: Request) -> Response:
    session, fields = await web.changing(request)
    found = await web.link.call("run", task=str(fields.get("task", "")), session=session.token)
    return web.done(request, found, f"/runs/{found['id']}")


def form_action(op: str, back: str, *names: str) -> Handler:
    """A form that calls ``op`` with its fields ``names`` (an empty owner
    is agent.yml's), then goes back to the page ``back``."""
    async def act(web: Web, request: Request) -> Response:
        _, fields = await web.changing(request)
        args: dict[str, Any] = {n: str(fields.get(n, "")) for n in names}
        if "owner" in args:
            args["owner"] = args["owner"] or None
        return web.done(request, await web.link.call(op, **args), back)
    return act


def run_action(op: str) -> Handler:
    async def act(web: Web, request: Request) -> Response:
        session, _ = await web.changing(request)
        run = _run_id(request)
        found = await web.link.call(op, run=run, session=session.token)
        return web.done(request, found, f"/runs/{run}")
    return act


async def image_build(web: Web, request: Request) -> Response:
    session, _ = await web.changing(request)
    found = await web.link.call("image_build", name=request.path_params["name"],
                                session=session.token)
    return web.done(request, found, f"/runs/{found['id']}")


async def key_delete(web: Web, request: Request) -> Response:
    session, fields = await web.changing(request)
    name, owner = str(fields.get("name", "")), str(fields.get("owner") or "") or None
    force = str(fields.get("force", "")) in ("1", "true", "True")
    try:
        found = await web.link.call("key_delete", name=name, owner=owner, force=force)
    except RemoteError as e:
        if e.code != "conflict" or wants_json(request):
            raise
        key = await web.link.call("key_show", name=name, owner=owner)
        return web.page(request, "key_delete.html", key, session, message=e.message)
    return web.done(request, found, "/keys")


async def key_scan(web: Web, request: Request) -> Response:
    session, fields = await web.changing(request)
    found = await web.link.call("key_scan", host=str(fields.get("host", "")),
                                port=_port(fields.get("port")))
    return web.page(request, "key_trust.html", found, session,
                    owner=str(fields.get("owner") or ""))


async def key_trust(web: Web, request: Request) -> Response:
    _, fields = await web.changing(request)
    found = await web.link.call("key_trust", host=str(fields.get("host", "")),
                                port=_port(fields.get("port")),
                                owner=str(fields.get("owner") or "") or None,
                                keys=str(fields.get("keys", "")))
    return web.done(request, found, "/keys")


def _port(value: object) -> int:
    text = str(value or "22")
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise Refusal(400, f"port must be a number from 1 to 65535, not {text[:20]!r}")
    return int(text)


async def logout(web: Web, request: Request) -> Response:
    session, _ = await web.changing(request)
    await web.link.call("web_logout", session=session.token)
    response = web.done(request, {"logged_out": True}, "/login")
    response.delete_cookie(COOKIE, path="/")
    return response


async def login_page(web: Web, request: Request) -> Response:
    html = web.templates.get_template("login.html").render(version=__version__)
    return HTMLResponse(html)


async def login(web: Web, request: Request) -> Response:
    """The login page posts the token from its URL's fragment here."""
    web.check_origin(request)
    body = await _read_body(request)
    try:
        token = json.loads(body).get("token", "")
    except (ValueError, AttributeError):
        raise Refusal(400, "the body must be JSON with a token") from None
    try:
        opened = await web.link.call("web_session_open", token=str(token))
    except RemoteError as e:
        raise Refusal(401, e.message) from None
    response = JSONResponse({"ok": True, "expires_at": opened["expires_at"]})
    response.set_cookie(COOKIE, opened["session"], max_age=int(opened["expires_at"] - time.time()),
                        path="/", secure=web.secure, httponly=True, samesite="strict")
    return response


class RawLog:
    """``GET /runs/N/raw``: the task's output bytes exactly as stored (what
    ``efci logs --raw`` prints), streamed, with a single HTTP Range."""

    def __init__(self, web: Web) -> None:
        self.web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        web = self.web
        try:
            web.check_host(request)
            await web.session(request)
            run = _run_id(request)
            total = await _output_size(web, run)
            start, stop, status = 0, total, 200
            headers = {"accept-ranges": "bytes", "content-type": "application/octet-stream",
                       "content-disposition": f'attachment; filename="run-{run}.log"'}
            if wanted := request.headers.get("range"):
                start, stop = _range(wanted, total)
                status = 206
                headers["content-range"] = f"bytes {start}-{stop - 1}/{total}"
        except (Refusal, RemoteError, AgentUnreachable) as e:
            await _refused(web, request, e)(scope, receive, send)
            return
        headers |= {"content-length": str(stop - start), **SECURITY_HEADERS}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        at = 0
        async with web.link.open("logs", run=run, raw=True) as exchange:
            while at < stop and "event" in (message := await exchange.next()):
                if message["event"] != "output":
                    continue
                payload = message["payload"]
                lo, hi = max(start - at, 0), min(stop - at, len(payload))
                if lo < hi:
                    body = bytes(memoryview(payload)[lo:hi])
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                at += len(payload)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _output_size(web: Web, run: int) -> int:
    total = 0
    async with web.link.open("logs", run=run) as exchange:
        while "event" in (message := await exchange.next()):
            total += sum(r[4] for r in message.get("records", []) if r[1] == Kind.OUTPUT)
    return total


def _range(header: str, total: int) -> tuple[int, int]:
    """One ``bytes=A-B``, ``bytes=A-`` or ``bytes=-N`` range, as [start, stop)."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    ok = unit.strip() == "bytes" and dash and "," not in spec and \
        (first.isdigit() or (not first and last.isdigit())) and (not last or last.isdigit())
    if not ok:
        raise Refusal(416, f"unsupported range {header[:60]!r}: give one bytes=START-END")
    if not first:
        start, stop = max(total - int(last), 0), total
    else:
        start, stop = int(first), min(int(last) + 1, total) if last else total
    if start >= total or start >= stop:
        raise RangeRefused(total)
    return start, stop


class RangeRefused(Refusal):
    def __init__(self, total: int) -> None:
        super().__init__(416, f"the range is beyond the end of the output ({total} bytes)")
        self.total = total


class LogStream:
    """``GET /runs/N/log``: the log's records as the agent sends them, in
    length-prefixed frames (a JSON header, then its records' bytes), from a
    position, a tail or up to a position, live with ``follow=1``.  The
    browser decodes the bytes; resuming from a frame's ``next`` neither
    loses nor repeats one.  A client that goes away ends the agent's side
    at once; one that stops reading blocks only this stream."""

    def __init__(self, web: Web) -> None:
        self.web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        web = self.web
        try:
            web.check_host(request)
            await web.session(request)
            run = _run_id(request)
            args = {"run": run, "position": _int(request, "position", 0),
                    "tail": _int(request, "tail"), "until": _int(request, "until"),
                    "until_skip": _int(request, "until_skip", 0),
                    "follow": request.query_params.get("follow") == "1"}
            opened = web.link.open("logs", **args)
            exchange = await opened.__aenter__()
            try:
                first = await exchange.next()  # errors (no such run, bad position) come first
            except BaseException:
                await opened.__aexit__(None, None, None)
                raise
        except (Refusal, RemoteError, AgentUnreachable) as e:
            await _refused(web, request, e)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/x-efci-log"),
            *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                message = first
                while True:
                    await send({"type": "http.response.body", "body": _frame(message),
                                "more_body": True})
                    if "event" not in message:
                        break
                    message = await exchange.next()
                nursery.cancel_scope.cancel()
        except (RemoteError, AgentUnreachable) as e:
            error = {"error": str(e)}
            await send({"type": "http.response.body", "body": _frame(error), "more_body": True})
        finally:
            await opened.__aexit__(None, None, None)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _frame(message: dict[str, Any]) -> bytes:
    """u32 length of a JSON header, the header, then ``size`` bytes of records."""
    payload = message.pop("payload", b"")
    header = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + payload


def _refused(web: Web, request: Request, e: Exception) -> Response:
    if isinstance(e, RangeRefused):
        response = web.refusal(request, 416, e.message)
        response.headers["content-range"] = f"bytes */{e.total}"
    elif isinstance(e, Refusal):
        response = web.refusal(request, e.status, e.message)
    elif isinstance(e, RemoteError):
        response = web.refusal(request, _STATUS_OF_CODE.get(e.code, 500), e.message)
    else:
        response = web.refusal(request, 503, str(e))
    response.headers.update(SECURITY_HEADERS)
    return response


def make_app(cfg: AgentConfig, link: AgentLink) -> Starlette:
    web = Web(cfg, link)

    def route(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> list[Route]:
        async def endpoint(request: Request) -> Response:
            try:
                web.check_host(request)
                response = await handler(web, request)
            except (Refusal, RemoteError, AgentUnreachable) as e:
                if isinstance(e, RemoteError | AgentUnreachable):
                    log.info("%s %s: %s", request.method, request.url.path, e)
                response = _refused(web, request, e)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                response = web.refusal(request, 500, "the page failed to answer this (a bug); "
                                       "the web page's log says why")
            response.headers.update(SECURITY_HEADERS)
            return response
        # Every page also under /api/, where the answer is JSON.
        return [Route(path, endpoint, methods=list(methods)),
                Route("/api" + path, endpoint, methods=list(methods))]

    async def home(request: Request) -> Response:
        return RedirectResponse("/runs", status_code=303)

    async def hook(request: Request) -> Response:
        return await gitea_hook(request, cfg.gitea_webhook_secret, link)

    routes = [
        Route("/", home),
        Route("/hooks/gitea", hook, methods=["POST"]),
        *route("/login", login_page),
        *route("/login", login, ("POST",)),
        *route("/logout", logout, ("POST",)),
        *route("/runs", runs_page),
        *route("/runs", run_start, ("POST",)),
        *route("/runs/{run}", run_page),
        *route("/runs/{run}/cancel", run_action("cancel"), ("POST",)),
        *route("/runs/{run}/restart", run_action("restart"), ("POST",)),
        *route("/runs/{run}/rm", run_action("rm"), ("POST",)),
        Route("/runs/{run}/raw", RawLog(web)),
        Route("/runs/{run}/log", LogStream(web)),
        Route("/api/runs/{run}/log", LogStream(web)),
        *route("/tasks", tasks_page),
        *route("/keys", keys_page),
        *route("/keys", form_action("key_create", "/keys", "name", "owner"), ("POST",)),
        *route("/keys/delete", key_delete, ("POST",)),
        *route("/keys/register", form_action("key_register", "/keys", "name", "repo", "owner"),
               ("POST",)),
        *route("/keys/scan", key_scan, ("POST",)),
        *route("/keys/trust", key_trust, ("POST",)),
        *route("/images", images_page),
        *route("/caches", caches_page),
        *route("/caches/quota", form_action("cache_set_quota", "/caches", "name", "quota",
                                            "owner"), ("POST",)),
        *route("/images/{name}/build", image_build, ("POST",)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes)
