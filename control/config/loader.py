"""Read a config directory into validated documents, collecting every error.

`read_config_files` takes the bytes of every `*.yaml` file once (the version hash and the
parse use the same bytes); `load_documents` parses each file (multi-document, SafeLoader
nodes), validates each document against its kind's model and turns each pydantic error
into a `ConfigIssue` at the key's or value's line:column. Nothing here stops at the first
error: a broken file does not hide the problems of the next one.
"""

from __future__ import annotations

import difflib
import json
import stat
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .gateway_schema import GatewayFile, gateway_issues
from .issues import ConfigInvalid, ConfigIssue, Severity, display_path, format_path
from .presets import UNSUPPORTED
from .schema import DocumentIssue, PolicyFile, PresetFile, policy_issues
from .values import NAME_RE
from .yamltree import Locator, NodeError, ParsedDocument, parse_documents

DocumentModel = PresetFile | PolicyFile | GatewayFile
MODELS: dict[str, type[DocumentModel]] = {
    "Preset": PresetFile,
    "Policy": PolicyFile,
    "Gateway": GatewayFile,
}
KINDS = tuple(MODELS)
CONFIG_SUFFIX = ".yaml"
KINDS_TEXT = "Preset, Policy or Gateway"
# Where a wrong-typed value may be a key or a token: never echo it.
SECRET_FIELDS = frozenset({"keys", "token", "origin_secret"})


@dataclass(frozen=True, slots=True)
class SourceFile:
    name: str  # file name inside the directory, e.g. "chat.yaml"
    display: str  # as printed in issues, e.g. "presets/chat.yaml"
    data: bytes


@dataclass(frozen=True, slots=True)
class ConfigFiles:
    """The bytes of one read of the directory. Equal reads compare equal."""

    directory: Path
    display: str
    files: tuple[SourceFile, ...]
    ignored: tuple[str, ...] = ()  # *.yml files, reported as a warning


# Far above any config file (the examples are a few KiB); past it a file is refused unread.
MAX_CONFIG_FILE_BYTES = 4 * 1024 * 1024


class _NotAConfigFile(Exception):
    """A `*.yaml` that is not a regular file of a readable size."""


def _read_file(path: Path) -> bytes:
    """A config file's bytes. A FIFO, a device (`/dev/zero` behind a symlink) or a socket
    named `*.yaml` is refused without being opened (reading one blocks, or never ends),
    and a file over MAX_CONFIG_FILE_BYTES is refused unread."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(str(path))
    if not stat.S_ISREG(info.st_mode):
        raise _NotAConfigFile("not a regular file (a FIFO, a device or a socket)")
    if info.st_size > MAX_CONFIG_FILE_BYTES:
        raise _NotAConfigFile(
            f"{info.st_size} bytes, over the {MAX_CONFIG_FILE_BYTES} a config file may have"
        )
    with path.open("rb") as file:
        data = file.read(MAX_CONFIG_FILE_BYTES + 1)
    if len(data) > MAX_CONFIG_FILE_BYTES:  # grew since the stat
        raise _NotAConfigFile(f"over the {MAX_CONFIG_FILE_BYTES} bytes a config file may have")
    return data


def read_config_files(directory: Path) -> ConfigFiles:
    """Every `*.yaml` (not hidden) directly in `directory`, sorted by name."""
    display = display_path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "no such directory"
        raise ConfigInvalid([ConfigIssue(display, None, None, "", what)])
    files: list[SourceFile] = []
    ignored: list[str] = []
    issues: list[ConfigIssue] = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.startswith("."):  # editor locks and swap files (.#x.yaml, .x.yaml.swp)
            continue
        if name.endswith(".yml"):
            ignored.append(display_path(path))
        if not name.endswith(CONFIG_SUFFIX):
            continue
        try:
            files.append(SourceFile(name, display_path(path), _read_file(path)))
        except FileNotFoundError:
            continue  # renamed or deleted after the listing: this read does not have it
        except IsADirectoryError:
            continue
        except _NotAConfigFile as exc:
            issues.append(ConfigIssue(display_path(path), None, None, "", str(exc)))
        except OSError as exc:
            issues.append(ConfigIssue(display_path(path), None, None, "", exc.strerror or str(exc)))
    if issues:
        raise ConfigInvalid(issues)
    return ConfigFiles(directory, display, tuple(files), tuple(ignored))


@dataclass(frozen=True, slots=True)
class Document:
    """One validated document and where its parts are in the file."""

    file: str
    index: int
    model: DocumentModel
    locator: Locator

    def issue(
        self,
        path: tuple[str | int, ...],
        message: str,
        *,
        at_key: bool = False,
        severity: Severity = "error",
    ) -> ConfigIssue:
        return located_issue(self.file, self.locator, path, message, at_key, severity)

    def where(self, path: tuple[str | int, ...] = ()) -> str:
        (line, column), _ = self.locator.find(path)
        return f"{self.file}:{line}:{column}"


def located_issue(
    file: str,
    locator: Locator,
    path: tuple[str | int, ...],
    message: str,
    at_key: bool = False,
    severity: Severity = "error",
) -> ConfigIssue:
    (line, column), _ = locator.find(path, at_key=at_key)
    return ConfigIssue(file, line, column, format_path(path), message, severity)


@dataclass(slots=True)
class LoadedDocuments:
    documents: list[Document] = field(default_factory=list)
    issues: list[ConfigIssue] = field(default_factory=list)
    # Names of documents that did not validate, per kind: a reference to one of them is
    # not reported again as "unknown" (the real error is already on the list).
    broken: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in KINDS})


def load_documents(files: ConfigFiles) -> LoadedDocuments:
    loaded = LoadedDocuments()
    for source in files.files:
        _load_file(source, loaded)
    return loaded


def _load_file(source: SourceFile, loaded: LoadedDocuments) -> None:
    def issue(mark: tuple[int, int], path: tuple[str | int, ...], message: str) -> None:
        loaded.issues.append(ConfigIssue(source.display, *mark, format_path(path), message))

    try:
        text = source.data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = source.data[: exc.start].count(b"\n") + 1
        issue((line, 1), (), f"not UTF-8 text (byte 0x{source.data[exc.start]:02x})")
        return
    try:
        parsed = list(parse_documents(text))
    except NodeError as exc:
        issue(exc.mark, exc.path, exc.message)
        # Its documents are unknown; a reference to a preset or policy named like the file
        # is most likely to one of them, and is not reported again.
        for kind in KINDS:
            loaded.broken[kind].add(Path(source.name).stem)
        return
    if not parsed:
        issue((1, 1), (), f"empty file: expected one or more documents with kind: {KINDS_TEXT}")
        return
    if all(doc.data is None and not doc.issues for doc in parsed):
        # `null` alone: as empty as no document, not a file that silently configures nothing.
        issue((1, 1), (), f"only null: expected one or more documents with kind: {KINDS_TEXT}")
        return
    kinds: Counter[str] = Counter(
        doc.data["kind"]
        for doc in parsed
        if isinstance(doc.data, dict) and isinstance(doc.data.get("kind"), str)
    )
    for doc in parsed:
        for err in doc.issues:
            issue(err.mark, err.path, err.message)
        if doc.data is not None:
            _load_document(source, doc, kinds, loaded)


def _load_document(
    source: SourceFile, doc: ParsedDocument, kinds: Counter[str], loaded: LoadedDocuments
) -> None:
    def issue(path: tuple[str | int, ...], message: str, at_key: bool = False) -> None:
        loaded.issues.append(located_issue(source.display, doc.locator, path, message, at_key))

    data = doc.data
    if not isinstance(data, dict):
        issue((), f"a document must be a mapping with kind: {KINDS_TEXT}")
        return
    kind = data.get("kind")
    if kind is None:
        issue((), f"missing required key 'kind' ({KINDS_TEXT})")
        return
    if not isinstance(kind, str) or kind not in MODELS:
        issue(
            ("kind",), f"unknown kind {kind!r}; expected {KINDS_TEXT}{_did_you_mean(kind, KINDS)}"
        )
        return
    stem = Path(source.name).stem
    if kind in ("Preset", "Policy") and "name" not in data:
        if kinds[kind] > 1:
            issue(
                (), f"missing required key 'name': this file holds {kinds[kind]} {kind} documents"
            )
            loaded.broken[kind].add(stem)
            return
        if not NAME_RE.fullmatch(stem):
            issue((), f"missing required key 'name' (the file name {stem!r} is not a valid name)")
            return
        data = {**data, "name": stem}  # one Preset (Policy) per file: named after the file
    model_cls = MODELS[kind]
    try:
        model = model_cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        for err in errors:
            loc = tuple(err["loc"])
            if err["type"] == "too_short" and any(
                len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc
                for other in errors
            ):
                continue  # "needs at least 1 item" only because an item was invalid
            issue(loc, describe_error(err, model_cls), at_key=err["type"] == "extra_forbidden")
        name = data.get("name")
        loaded.broken[kind].add(name if isinstance(name, str) else "")
        return
    document = Document(source.display, doc.index, model, doc.locator)
    # Rules across fields: reported here; the document still goes on to the cross-document
    # checks, so their errors are listed in the same run.
    problems = document_issues(model)
    loaded.issues += [document.issue(path, message) for path, message in problems]
    loaded.documents.append(document)


def document_issues(doc: DocumentModel) -> list[DocumentIssue]:
    """Rules that relate fields of one document (the schema modules hold them)."""
    if isinstance(doc, PolicyFile):
        return policy_issues(doc)
    if isinstance(doc, GatewayFile):
        return gateway_issues(doc)
    return []


# --- pydantic error -> message ------------------------------------------------------------


def _did_you_mean(word: object, choices: typing.Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe_input(value: Any, redact: bool) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "an empty value (null)"
    if isinstance(value, str):
        return "a string" if redact else f"the string {json.dumps(value)}"
    if isinstance(value, int | float):
        return "a number" if redact else f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _unwrap(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may hold, without Annotated/Optional wrappers."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _fields_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` (for "did you mean"); [] when unknown."""
    current: list[Any] = [model_cls]
    for item in loc:
        following: list[Any] = []
        for tp in current:
            if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(item, str):
                info = tp.model_fields.get(item)
                if info is not None:
                    following += _unwrap(info.annotation)
            elif typing.get_origin(tp) in (tuple, list) and isinstance(item, int):
                following += _unwrap(typing.get_args(tp)[0])
            elif typing.get_origin(tp) is dict:
                following += _unwrap(typing.get_args(tp)[1])
        current = following
    names: list[str] = []
    for tp in current:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            names += list(tp.model_fields)
    return names


def describe_error(err: ErrorDetails, model_cls: type[BaseModel]) -> str:
    """One pydantic error as a sentence for ops."""
    kind = err["type"]
    loc = tuple(err["loc"])
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    redact = any(item in SECRET_FIELDS for item in loc)
    got = _describe_input(value, redact)
    last = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        if (
            len(loc) >= 2
            and loc[-2] == "generation"
            and isinstance(last, str)
            and last in UNSUPPORTED
        ):
            return f"{last}: {UNSUPPORTED[last].reason}"
        hint = _did_you_mean(last, _fields_at(model_cls, loc[:-1]))
        return f"unknown key {last!r}{hint}"
    if kind == "missing":
        return f"missing required key {last!r}"
    expected = {
        "float_type": "a number",
        "float_parsing": "a number",
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "tuple_type": "a list",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
    }.get(kind)
    if expected is not None:
        return f"expected {expected}, got {got}"
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        key, op = bounds[kind]
        return f"must be {op} {ctx[key]}, got {value}"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return f"needs at least {count} item{'s' if count != 1 else ''}"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} items"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {got}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return str(err["msg"])
