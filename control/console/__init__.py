"""The browser console under `/console`: live state, config history, A/B verdicts, playground.

It owns the pages and their JSON endpoints, the login session (a signed, HttpOnly,
SameSite=Strict cookie derived from the admin token, so it holds across `--workers` and
replicas and dies when the token changes), the bounded in-memory series the live page
charts, and the config history the reloader feeds. It plugs into the data plane through
the extra-routes seam and one completion hook; nothing in `proxy/` imports it. Read-only
except the playground, which sends one request through the normal pipeline as the
reserved caller `@console`.
"""

from __future__ import annotations

from .routes import CONSOLE_PREFIX, ConsoleServices, console_routes

__all__ = ["CONSOLE_PREFIX", "ConsoleServices", "console_routes"]
