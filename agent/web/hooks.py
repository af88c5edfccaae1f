"""``POST /hooks/gitea``: Gitea's webhooks, for the agent.

The signature (``X-Gitea-Signature``: hex HMAC-SHA256 of the exact body,
keyed with the webhook's secret) is checked, in constant time, before
anything else of the request is read; the body is capped; a push is handed
to the agent's ``push`` operation, which queues its runs and answers at once.
No session: the secret is the credential, and Gitea is no browser.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import protocol
from ..client import RemoteError
from ..errors import AgentUnreachable
from ..secretfile import read_own
from .link import AgentLink

log = logging.getLogger(__name__)

MAX_BODY = 5 << 20  # a push of many commits is well under; 100 MB is refused unread
_STATUS = {"bad_request": 400, "unreachable": 503}


def refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def gitea_hook(request: Request, secret_file: Path, link: AgentLink) -> Response:
    length = request.headers.get("content-length", "")
    if length and (not length.isdigit() or int(length) > MAX_BODY):
        return refuse(413, f"a webhook body is at most {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return refuse(413, f"a webhook body is at most {MAX_BODY} bytes")
    try:
        secret = read_own(secret_file)
    except OSError as e:  # PermissionError included
        log.error("a webhook came, but its secret cannot be used: %s", e)
        return refuse(503, "webhooks are not set up on this CI host; its log says why")
    given = request.headers.get("x-gitea-signature", "")
    wanted = hmac.new(secret, bytes(body), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.lower().encode(), wanted.encode()):
        log.warning("refused a webhook with %s signature", "a wrong" if given else "no")
        return refuse(401, "the X-Gitea-Signature is missing or wrong")
    event = request.headers.get("x-gitea-event", "")
    delivery = request.headers.get("x-gitea-delivery", "")
    if event != "push":
        log.info("webhook %s: ignored a %r event (only push starts runs)", delivery, event[:40])
        return JSONResponse({"ignored": f"{event[:40]!r} events start nothing"}, status_code=202)
    try:
        fields = push_fields(protocol.loads(bytes(body)))
    except (ValueError, KeyError, TypeError) as e:
        return refuse(400, f"not a Gitea push: {e}")
    try:
        answer = await link.call("push", delivery=delivery, **fields)
    except RemoteError as e:
        return refuse(_STATUS.get(e.code, 500), e.message)
    except AgentUnreachable as e:
        return refuse(503, str(e))
    return JSONResponse(answer, status_code=202)


def push_fields(payload: Any) -> dict[str, str]:
    """The fields of a push body the agent needs, each a string."""
    if not isinstance(payload, dict):
        raise TypeError("the body is not a JSON object")
    repo, pusher = payload["repository"], payload.get("pusher") or {}
    if not isinstance(repo, dict) or not isinstance(pusher, dict):
        raise TypeError("repository and pusher must be objects")
    fields = {"repository": repo.get("full_name", ""), "ssh_url": repo.get("ssh_url", ""),
              "clone_url": repo.get("clone_url", ""), "ref": payload["ref"],
              "before": payload["before"], "after": payload["after"],
              "pusher": pusher.get("login") or pusher.get("username") or ""}
    for name, value in fields.items():
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string")
    return fields
