"""`sluice key new APP`: a fresh API key, printed once, with the line to paste.

The key is 32 random bytes (urlsafe base64) behind a `sk-` prefix that secret scanners
recognise. Only its SHA-256 digest goes into the Gateway document; the key itself is
printed here once and stored nowhere, so a lost key is replaced, never recovered.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from typing import TextIO

from sluice.control.errors import CliError

from .values import check_name

KEY_PREFIX = "sk-sluice-"
KEY_BYTES = 32


def new_key() -> tuple[str, str]:
    """(key, "sha256:<hex>") for a fresh key."""
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def print_new_key(app: str, out: TextIO) -> None:
    try:
        check_name(app)
    except ValueError as exc:
        raise CliError(f"app name: {exc}") from None
    key, digest = new_key()
    out.write(
        f"API key for app {app!r}; it is shown only now, store it in your secret manager:\n\n"
        f"  {key}\n\n"
        f"Add this line to the app's keys in the Gateway document (or put the key in an\n"
        f"environment variable and add env:VAR instead):\n\n"
        f'  - "{digest}"  # {app}\n'
    )
    out.flush()


def run_new(args: argparse.Namespace) -> int:
    print_new_key(args.app, sys.stdout)
    return 0


__all__ = ["KEY_PREFIX", "new_key", "print_new_key", "run_new"]
