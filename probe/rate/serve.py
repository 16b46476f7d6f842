"""Serving a study: rater links, the host check, and uvicorn on a socket bound before the links are printed."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from probe.errors import UsageError
from probe.store.votes import Study, VoteStore

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Served:
    url: str
    links: list[tuple[str, str]]
    """(rater, link) of every rater of a study by link; empty for an open study."""


def ensure_raters(store: VoteStore, study: Study, n_raters: int, names: list[str]) -> list[tuple[str, str]]:
    """The study's raters, adding named ones and numbered ones (rater-01 ...) up to `n_raters` in all."""
    for name in names:
        store.add_rater(study.id, name, secrets.token_urlsafe(24))
    existing = store.raters(study.id)
    taken = {rater for rater, _ in existing}
    number = 1
    while len(existing) < n_raters:
        name = f"rater-{number:02d}"
        number += 1
        if name not in taken:
            store.add_rater(study.id, name, secrets.token_urlsafe(24))
            existing = store.raters(study.id)
    return existing


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), bound before links are printed, so they name the real port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc})") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another port or "
                         "--port 0 for any free one") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def allowed_hosts(host: str) -> list[str]:
    hosts = {host, LOOPBACK, "localhost", "[::1]", "::1"}
    return sorted(hosts) if host not in ("0.0.0.0", "::") else ["*"]  # noqa: S104 - a deliberate --host


def serve(run_dir: Path, study: Study, links: list[tuple[str, str]], host: str, port: int,
          announce: Callable[[Served], None], flagged: Collection[str] = ()) -> None:
    """Serve until Ctrl-C (uvicorn finishes the requests in flight, so no acknowledged vote is lost); pages warn of
    the study's images among `flagged` (keys a safety detector flagged)."""
    import uvicorn

    from probe.rate.app import create_app

    if not is_loopback(host):
        log.warning("--host %s: the study is reachable from other machines; anyone with a rater link can vote", host)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host  # noqa: S104 - links others can open
    shown_host = shown_host if ":" not in shown_host else f"[{shown_host}]"
    url = f"http://{shown_host}:{bound}"
    app = create_app(run_dir, study.id, allowed_hosts(host), flagged)
    announce(Served(url, [(rater, f"{url}/r/{token}") for rater, token in links]))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
