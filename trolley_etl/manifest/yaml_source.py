"""YAML loading that remembers where every key and item came from, and keeps what was written.

Errors in a manifest must point at `FILE:LINE:COL`, so the document is composed into nodes
first (keeping PyYAML's marks), walked once to record each path's position and to reject
duplicate keys (which plain YAML loading silently resolves to the last one), then constructed
node by node, so a value that cannot be constructed (`2024-13-45`) is an error at its place.

Identifiers must reach the archive as the user wrote them: YAML 1.1 would read
`PatientID: 0012345` as octal 5349, `0x1F` as 31, `yes` as true, `.nan` as a float and
`12:30:00` as 45000 seconds. So the plain scalars of query filters, `select` and cohort lists
are kept as their text (an ISO date such as 2024-01-31 still becomes a date, which filters
write as 20240131; `~`/null stays null). Untrusted manifests are bounded too: at most
MAX_MANIFEST_BYTES, and aliases may not expand the document past MAX_NODES nodes (a
"billion laughs" file is refused at once instead of eating the machine).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

#: Largest manifest read, in bytes (a real one is a few kB; a cohort belongs in a CSV).
MAX_MANIFEST_BYTES = 1 << 20
#: Nodes the document may have once aliases are expanded (a large manifest has a few thousand).
MAX_NODES = 100_000
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class YamlDocument:
    data: Any
    positions: dict[Path_, Position] = field(default_factory=dict)

    def position(self, path: Path_) -> Position:
        """The position of the deepest known prefix of `path` (the document start if none)."""
        for end in range(len(path), -1, -1):
            found = self.positions.get(path[:end])
            if found is not None:
                return found
        return Position(1, 1)


class YamlProblem(Exception):
    """A YAML syntax error or a duplicate key, with its position."""

    def __init__(self, message: str, position: Position, path: Path_ = ()) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.path = path


def _mark(mark: yaml.Mark | None) -> Position:
    return Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)


def parse_yaml(text: str) -> YamlDocument:
    """Parse one YAML document; raise YamlProblem with a position on any error."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise YamlProblem(
            f"the manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB; put long cohort "
            "lists in a CSV file (from_csv)",
            Position(1, 1),
        )
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlProblem(f"YAML syntax error: {problem}", _mark(mark)) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"YAML error: {exc}", Position(1, 1)) from None
    except RecursionError:
        raise YamlProblem("YAML error: the document is nested too deeply", Position(1, 1)) from None
    if node is None:
        return YamlDocument(None, {(): Position(1, 1)})
    positions: dict[Path_, Position] = {(): _mark(node.start_mark)}
    budget = [MAX_NODES]
    try:
        _walk(node, (), positions, budget)
        data = _Builder().build(node, ())
    except RecursionError:
        raise YamlProblem("YAML error: the document is nested too deeply", Position(1, 1)) from None
    return YamlDocument(data, positions)


def _is_literal_path(path: Path_) -> bool:
    """Paths whose plain scalars are kept as written: filter values and cohort lists."""
    if len(path) >= 4 and path[0] == "queries" and path[2] == "filters":
        return True
    if len(path) >= 3 and path[0] == "queries" and path[2] == "study_uids":
        return True
    return len(path) >= 3 and path[:2] == ("select", "series")


class _Builder:
    """Python values from nodes; see the module docstring for which scalars stay text."""

    def __init__(self) -> None:
        self._loader = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node, ()) if isinstance(key_node, yaml.ScalarNode) else None
                if key is None or isinstance(key, (list, dict)):
                    raise YamlProblem("keys must be plain text", _mark(key_node.start_mark))
                result[key] = self.build(value_node, (*path, str(key)))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _scalar(self, node: yaml.Node, path: Path_) -> Any:
        if _is_literal_path(path) and isinstance(node, yaml.ScalarNode):
            text = str(node.value)
            if node.style is not None:  # quoted or block: YAML keeps it as text anyway
                return text
            if node.tag == _NULL_TAG:
                return None
            if _ISO_DATE.match(text):
                return self._construct(node, path)  # a date; an impossible one is refused
            return text
        return self._construct(node, path)

    def _construct(self, node: yaml.Node, path: Path_) -> Any:
        try:
            value = self._loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            reason = getattr(exc, "problem", None) or str(exc)
            raise YamlProblem(
                f"cannot read {node.value!r}: {reason}", _mark(node.start_mark), path
            ) from None
        return value


def _walk(
    node: yaml.Node, path: Path_, positions: dict[Path_, Position], budget: list[int]
) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlProblem(
            f"the document expands to more than {MAX_NODES} values (aliases repeated over and "
            "over?); a manifest this large is refused",
            _mark(node.start_mark),
            path,
        )
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, Position] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            here = _mark(key_node.start_mark)
            if key in seen:
                first = seen[key]
                raise YamlProblem(
                    f"duplicate key {key!r} (first defined on line {first.line})",
                    here,
                    (*path, key),
                )
            seen[key] = here
            key_path = (*path, key)
            positions[key_path] = here
            _walk(value_node, key_path, positions, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            item_path = (*path, index)
            positions[item_path] = _mark(item.start_mark)
            _walk(item, item_path, positions, budget)
