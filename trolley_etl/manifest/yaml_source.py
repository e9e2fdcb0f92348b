"""YAML loading that remembers where every key and item came from.

Errors in a manifest must point at `FILE:LINE:COL`, so the document is composed into nodes
first (keeping PyYAML's marks), walked once to record each path's position and to reject
duplicate keys (which plain YAML loading silently resolves to the last one), then constructed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


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
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlProblem(f"YAML syntax error: {problem}", _mark(mark)) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"YAML error: {exc}", Position(1, 1)) from None
    if node is None:
        return YamlDocument(None, {(): Position(1, 1)})
    positions: dict[Path_, Position] = {(): _mark(node.start_mark)}
    _walk(node, (), positions)
    try:
        data = yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as exc:  # e.g. an unhashable key; rare after compose succeeded
        raise YamlProblem(f"YAML error: {exc}", Position(1, 1)) from None
    return YamlDocument(data, positions)


def _walk(node: yaml.Node, path: Path_, positions: dict[Path_, Position]) -> None:
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
            _walk(value_node, key_path, positions)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            item_path = (*path, index)
            positions[item_path] = _mark(item.start_mark)
            _walk(item, item_path, positions)
