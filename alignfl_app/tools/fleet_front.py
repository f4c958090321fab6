"""The coordinator's silo-facing TLS port: Flower's Fleet API forwarded to the SuperLink on loopback, nothing else.

Flower 1.42 serves its Fleet, Control and Runtime APIs on one HTTP port, and the Control API checks no
client (account login is in Flower's enterprise edition only): anyone who reaches that port with the CA
certificate can register or unregister SuperNodes and start runs. So the SuperLink listens on 127.0.0.1
and this front is the only port silos reach; the operator uses the Control API on the coordinator itself.
The front also attaches the operator's app signatures (alignfl_app.tools.app_signing) to each FAB a
SuperNode fetches; the SuperNode checks them against its trusted entities.
Our own code rather than nginx or haproxy: it runs on the uvicorn and httpx that Flower pins and serves
this API with, adds no system service, and must rewrite the protobuf GetFab reply.

The front reads at most ``--max-body-mb`` of request bodies at a time, all requests together: a body announced
larger is refused before a byte of it is read, one that grows larger while it streams is cut off there, so no
sender, with or without a credential, makes the front (or the SuperLink behind it) buffer more than that.

    alignfl fleet-front --certs CERT_DIR --signatures SIGNATURE_DIR [--host 0.0.0.0] [--port 9093]
                        [--superlink-port 9091] [--max-body-mb 256]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from flwr.proto.fab_pb2 import GetFabResponse  # pylint: disable=no-name-in-module
from flwr.superlink.routers.fleet.router import router as fleet_router
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from alignfl_app.tools.app_signing import verifications

log = logging.getLogger("alignfl.fleet_front")

# Every Fleet API route of the pinned Flower, taken from Flower's own router (all POST)
FLEET_PATHS = frozenset(route.path for route in fleet_router.routes)
GET_FAB_PATH = "/v1/fleet/get-fab"
# hop-by-hop or recomputed by the server that sends the message on
DROPPED_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "upgrade",
        "te",
        "trailer",
        "server",
        "date",
    }
)
UPSTREAM_TIMEOUT_S = 120.0
MAX_BODY_MB = 256.0
"""Request bodies in flight at once, in MiB: a train reply carries one decoder (max-decoder-mb, 64 by default) and
its descriptor, so a few silos' replies fit side by side."""


class BodyTooLarge(Exception):
    """A request body that would take the bodies in flight past the front's limit."""


class BodyBudget:
    """The bytes of request bodies the front holds at once, across requests (one event loop: no lock needed)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.held = limit_bytes, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise BodyTooLarge
        self.held += n

    def give_back(self, n: int) -> None:
        self.held -= n


async def read_body(request: Request, budget: BodyBudget) -> bytes:
    """The request's body, read chunk by chunk against ``budget`` (BodyTooLarge as soon as it would pass it; an
    announced Content-Length past it is refused before reading). The caller gives back ``len`` of the result."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > budget.limit:
        raise BodyTooLarge
    chunks, taken = [], 0
    try:
        async for chunk in request.stream():
            budget.take(len(chunk))
            taken += len(chunk)
            chunks.append(chunk)
    except BaseException:
        budget.give_back(taken)
        raise
    return b"".join(chunks)


def kept_headers(headers: httpx.Headers | dict) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in DROPPED_HEADERS}


def sign_fab_reply(body: bytes, signatures: Path) -> bytes:
    """The GetFab reply with the operator's signatures of its FAB as ``fab.verifications`` (unsigned: none)."""
    reply = GetFabResponse()
    reply.ParseFromString(body)
    found = verifications(reply.fab.content, signatures)
    digest = hashlib.sha256(reply.fab.content).hexdigest()[:8]
    if len(found) > 1:
        log.info("FAB %s goes out with the signatures of %s", digest, sorted(set(found) - {"valid_license"}))
    else:
        log.warning(
            "FAB %s has no operator signature in %s: SuperNodes will refuse it "
            "(sign the app with deploy/sign-app.sh, then start the run again)",
            digest,
            signatures,
        )
    reply.fab.verifications.clear()
    reply.fab.verifications.update(found)
    return reply.SerializeToString(deterministic=True)


def create_app(superlink: str, ca_cert: Path, signatures: Path, max_body_mb: float = MAX_BODY_MB) -> Starlette:
    """The front: ``POST`` to a Fleet API path goes to ``superlink`` (https, checked against ``ca_cert``); anything
    else is answered 404 here and never reaches the SuperLink, and a body past ``max_body_mb`` (all requests in
    flight together) 413."""
    state: dict[str, httpx.AsyncClient] = {}
    budget = BodyBudget(int(max_body_mb * 2**20))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        context = ssl.create_default_context(cafile=str(ca_cert))
        async with httpx.AsyncClient(
            base_url=f"https://{superlink}", verify=context, timeout=UPSTREAM_TIMEOUT_S
        ) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or path not in FLEET_PATHS:
            client = request.client.host if request.client else "?"
            log.warning("refused %s %s from %s: this port serves the Fleet API only", request.method, path, client)
            return PlainTextResponse("not found: this port serves Flower's Fleet API only\n", status_code=404)
        try:
            content = await read_body(request, budget)
        except BodyTooLarge:
            client = request.client.host if request.client else "?"
            log.warning("refused a body past %.0f MiB for %s from %s", budget.limit / 2**20, path, client)
            return PlainTextResponse(
                f"request body too large: this port takes at most {budget.limit / 2**20:.0f} MiB in flight\n",
                status_code=413,
                headers={"connection": "close"},
            )
        try:
            upstream = await state["client"].post(path, content=content, headers=kept_headers(request.headers))
        except httpx.TransportError as err:
            log.warning("SuperLink unreachable for %s: %s", path, err)
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        finally:
            budget.give_back(len(content))
        body = upstream.content
        if path == GET_FAB_PATH and upstream.status_code == 200:
            body = sign_fab_reply(body, signatures)
        return Response(body, status_code=upstream.status_code, headers=kept_headers(upstream.headers))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl fleet-front", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--certs", type=Path, required=True, help="folder with ca.crt, server.pem and server.key (deploy/make-certs.sh)"
    )
    parser.add_argument(
        "--signatures", type=Path, required=True, help="folder of the operator's app signatures (deploy/sign-app.sh)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address silos connect to")
    parser.add_argument("--port", type=int, default=9093)
    parser.add_argument("--superlink-port", type=int, default=9091, help="the SuperLink's port on 127.0.0.1")
    parser.add_argument(
        "--max-body-mb", type=float, default=MAX_BODY_MB, help="request bodies held at once, all requests together"
    )
    args = parser.parse_args(argv)
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (args.certs / name).is_file():
            parser.error(
                f"{args.certs / name} missing; make it with deploy/make-certs.sh {args.certs} <public host name>"
            )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    app = create_app(f"127.0.0.1:{args.superlink_port}", args.certs / "ca.crt", args.signatures, args.max_body_mb)
    log.info(
        "Fleet API on %s:%d -> SuperLink 127.0.0.1:%d; app signatures from %s",
        args.host,
        args.port,
        args.superlink_port,
        args.signatures,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.certs / "server.pem"),
        ssl_keyfile=str(args.certs / "server.key"),
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
