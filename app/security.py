"""Optional API keys: with API_KEYS set, every route but /health and /ready (and /metrics when
METRICS_REQUIRE_KEY=false) needs `Authorization: Bearer <key>`. Keys are compared in constant time,
against every configured key, so neither timing nor position leaks which one nearly matched."""

from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import HTTPException, Request

log = logging.getLogger("app.security")


def _presented(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(presented: str, keys: list[str]) -> bool:
    found = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: passes when no keys are configured, or the request carries one of them."""
    settings = request.app.state.settings
    if not settings.api_keys:
        return
    if request.url.path.startswith("/metrics") and not settings.metrics_require_key:
        return
    presented = _presented(request)
    if presented is None or not key_matches(presented, settings.api_keys):
        detail = "missing API key: send Authorization: Bearer <key>" if presented is None else "invalid API key"
        raise HTTPException(401, detail=detail, headers={"WWW-Authenticate": 'Bearer realm="gated-prune"'})


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, api_keys: list[str]) -> bool:
    """Log a warning (and return True) when the service listens beyond loopback without keys."""
    if api_keys or is_loopback(host):
        return False
    log.warning("listening on %s without API keys: anyone who reaches the port can predict and read /metrics "
                "(set API_KEYS, or keep HOST on 127.0.0.1 behind a proxy that authenticates)", host)
    return True
