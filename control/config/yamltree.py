"""YAML text -> plain Python values plus the line:column of every key and value.

Parsing goes through `yaml.SafeLoader` only, stopping at the node graph (`compose_all`),
and builds the values by walking the nodes ourselves: that keeps each node's mark (so a
pydantic error location maps back to file:line:column) and catches what PyYAML's
constructor would hide, above all a duplicated key, which it silently resolves to the
last value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[str | int, ...]
Mark = tuple[int, int]  # 1-based line, column

NULL_TAG = "tag:yaml.org,2002:null"
# Aliases can make a small file expand exponentially ("billion laughs"); a config is small.
MAX_NODES = 200_000
# Deeper than any config nests (~8 levels); a recursive alias (`&a {x: *a}`) is endless.
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class NodeError(Exception):
    """A problem found while walking the nodes, located at `mark`."""

    mark: Mark
    path: Path
    message: str


@dataclass(slots=True)
class Locator:
    """Marks of one document: the value at each path, and the key that introduces it."""

    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)

    def find(self, path: Path, *, at_key: bool = False) -> tuple[Mark, Path]:
        """The mark of `path`, or of its longest prefix that exists in the file."""
        probe = path
        while True:
            if at_key and probe == path and probe in self.keys:
                return self.keys[probe], probe
            if probe in self.values:
                return self.values[probe], probe
            if not probe:
                return (1, 1), ()
            probe = probe[:-1]


def mark_of(node: Node) -> Mark:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _scalar_text(node: Node) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else type(node).__name__


class _Walker:
    def __init__(self) -> None:
        self.constructor = SafeConstructor()
        self.locator = Locator()
        self.issues: list[NodeError] = []
        self.count = 0

    def value(self, node: Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise NodeError(mark_of(node), path, f"more than {MAX_NODES} values (aliases?)")
        if len(path) > MAX_DEPTH:
            raise NodeError(
                mark_of(node),
                path[:MAX_DEPTH],
                f"nested more than {MAX_DEPTH} levels (a recursive alias?)",
            )
        self.locator.values.setdefault(path, mark_of(node))
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            return [self.value(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            problem = exc.problem or "cannot read this value"
            raise NodeError(mark_of(node), path, problem) from None

    def mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        first_seen: dict[Any, Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.key(key_node, path)
            if key in first_seen:
                line = first_seen[key][0]
                self.issues.append(
                    NodeError(
                        mark_of(key_node),
                        (*path, key),
                        f"duplicate key {key!r} (first at line {line}); "
                        "YAML would silently keep the last one",
                    )
                )
            else:
                first_seen[key] = mark_of(key_node)
        try:
            # `<<: *anchor` merge keys; explicit keys after the merge override merged ones.
            self.constructor.flatten_mapping(node)
        except ConstructorError as exc:
            raise NodeError(mark_of(node), path, exc.problem or "bad merge key") from None
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            self.locator.keys.setdefault((*path, key), mark_of(key_node))
            result[key] = self.value(value_node, (*path, key))
        return result

    def key(self, node: Node, path: Path) -> str:
        value = self.constructor.construct_object(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            raise NodeError(
                mark_of(node),
                path,
                f"keys must be strings, got {_scalar_text(node)!r} (quote it)",
            )
        return value


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    index: int  # 0-based position in the file
    mark: Mark  # where the document starts
    data: Any
    locator: Locator
    issues: tuple[NodeError, ...]


def _yaml_error_text(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or "syntax error"
    if "'\\t'" in problem or "tab character" in problem:
        return "tab character used for indentation; YAML allows only spaces"
    text = f"YAML syntax error: {problem}"
    if exc.context and exc.context_mark is not None:
        text += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return text


def parse_documents(text: str) -> Iterator[ParsedDocument]:
    """Every non-empty document of one file; raises NodeError on a syntax error."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise NodeError(where, (), _yaml_error_text(exc)) from None
    except yaml.YAMLError as exc:  # e.g. a reader error on a control character
        raise NodeError((1, 1), (), f"YAML error: {exc}") from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise NodeError(
            (_too_deep_line(text), 1), (), f"nested more than {MAX_DEPTH} levels deep"
        ) from None
    for index, node in enumerate(nodes):
        if isinstance(node, ScalarNode) and node.tag == NULL_TAG and node.value in ("", "~"):
            continue  # an empty document between two `---`
        walker = _Walker()
        try:
            data = walker.value(node, ())
        except NodeError as exc:
            walker.issues.append(exc)
            data = None
        yield ParsedDocument(index, mark_of(node), data, walker.locator, tuple(walker.issues))


def _too_deep_line(text: str) -> int:
    """The first line where flow brackets (`[`, `{`) nest past MAX_DEPTH: where a file too
    deep for the parser goes wrong (quoted brackets may count; it is a pointer, not a
    parse)."""
    depth = 0
    for number, line in enumerate(text.splitlines(), 1):
        for char in line:
            if char in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    return number
            elif char in "]}":
                depth -= 1
    return 1
