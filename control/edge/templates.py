"""Jinja2 for edge files, where no string from a config reaches a file unchecked.

Templates get StrictUndefined and no autoescaping. Instead, every `{{ ... }}` must pass
through one of the filters here, each of which checks or quotes its value for the file's
language (an nginx token, a comment, a JSON value in JavaScript, a TOML string) and marks
the result `Emitted`; the environment's `finalize` refuses anything else. A template that
forgets a filter fails to render: it cannot write a raw string.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from sluice.control.errors import CliError

# An nginx argument that needs no quoting and can neither end a directive (`;`, `{`, `}`),
# start a comment (`#`), interpolate a variable (`$`), nor escape (`\`, quotes, spaces).
# Host names, host:port, [v6]:port, file paths, CIDRs and rates all fit.
NGINX_TOKEN_RE = re.compile(r"[A-Za-z0-9._:/\[\]*+-]+")
# Text for a `#` or `//` comment: one line, and nothing that could end a block comment.
COMMENT_RE = re.compile(r"[A-Za-z0-9 .,:;+()'_-]*")


class RenderError(ValueError):
    """A value that cannot be written safely, or a template that skipped the filters."""


class Emitted(str):
    """Text a filter has checked or quoted for the output's language."""

    __slots__ = ()


def _nginx_token(value: object) -> Emitted:
    if not isinstance(value, str) or not NGINX_TOKEN_RE.fullmatch(value):
        raise RenderError(f"{value!r} cannot be written into an nginx config")
    return Emitted(value)


def _comment(value: object) -> Emitted:
    if not isinstance(value, str) or not COMMENT_RE.fullmatch(value):
        raise RenderError(f"{value!r} cannot be written into a comment")
    return Emitted(value)


def _number(value: object) -> Emitted:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RenderError(f"{value!r} is not a non-negative integer")
    return Emitted(str(value))


def _json(value: object) -> Emitted:
    """A JSON value, valid JavaScript too: ensure_ascii leaves no U+2028/U+2029 or other
    characters that a JS source could read differently."""
    return Emitted(json.dumps(value, ensure_ascii=True, sort_keys=True, indent=2))


def _toml_string(value: object) -> Emitted:
    """A TOML basic string: JSON's string escapes (\\" \\\\ \\n \\uXXXX) are all TOML's too;
    DEL, which JSON leaves raw and TOML forbids, is escaped as well."""
    if not isinstance(value, str):
        raise RenderError(f"{value!r} is not a string")
    return Emitted(json.dumps(value, ensure_ascii=True).replace("\x7f", "\\u007f"))


def _finalize(value: Any) -> Emitted:
    if isinstance(value, Emitted):
        return value
    raise RenderError(f"template wrote {value!r} without a filter ({', '.join(FILTERS)})")


FILTERS: Mapping[str, Callable[[Any], Emitted]] = {
    "nginx": _nginx_token,
    "comment": _comment,
    "number": _number,
    "json": _json,
    "toml": _toml_string,
}


def template_dir(package: str) -> Path:
    """The folder of a template package (`sluice.edge.nginx`), editable install or wheel."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CliError(f"the templates package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def environment(package: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir(package)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    return env


@dataclass(frozen=True, slots=True)
class RenderedFiles:
    """File name -> text, in the order written; warnings go to stderr."""

    files: Mapping[str, str]
    warnings: tuple[str, ...] = ()
