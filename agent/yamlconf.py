"""Strict YAML reading for agent.yml and declarations, with located errors.

PyYAML's safe loader is still too forgiving for files that decide what runs
as root: it keeps the last of two duplicate keys, expands aliases without
bound (the "billion laughs" bomb), and reads YAML 1.1 plain scalars such as
``no``, ``on`` or ``0755`` as booleans and octal integers where a string was
meant.  So we only *compose* the document into nodes (no construction),
refuse anchors and aliases outright, and let the schema code pull typed
values out of :class:`Node` objects that know their file, line and field path.
Every error is a :class:`ConfigError` naming all three.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from . import names
from .errors import ConfigError

MAX_FILE_BYTES = 1 << 20

_STR_TAG = "tag:yaml.org,2002:str"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NULL_TAG = "tag:yaml.org,2002:null"


class _NoAliasLoader(yaml.SafeLoader):
    """Composes nodes but refuses anchors and aliases (no expansion bombs)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise ConfigError(
                self.name, mark.line + 1, "",
                "anchors and aliases (&name, *name) are not allowed; write the value out",
            )
        return super().compose_node(parent, index)


def load_file(path: Path, *, display: str | None = None) -> Node | None:
    """Read and compose one YAML file; ``None`` for an empty document."""
    name = display or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(name, 0, "", f"cannot read: {e.strerror}") from e
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(name, 0, "", f"larger than {MAX_FILE_BYTES} bytes; refusing to parse")
    return load_bytes(data, name)


def load_bytes(data: bytes, name: str) -> Node | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(name, line, "", "not valid UTF-8") from e
    try:
        loader = _NoAliasLoader(text)  # the reader refuses control characters right here
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(name, line, "", f"character U+{code:04X} is not allowed in YAML "
                          "(control characters must be written as escapes in double quotes)"
                          ) from None
    loader.name = name
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        problem = f"YAML syntax: {e.problem or e.context}"
        if e.problem and e.context and e.context_mark:
            problem += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(name, line, "", problem) from e
    except yaml.YAMLError as e:
        raise ConfigError(name, 0, "", f"YAML: {e}") from e
    finally:
        loader.dispose()
    if root is None:
        return None
    return Node(root, name, "")


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = {
        _BOOL_TAG: "a boolean", _INT_TAG: "a number", _FLOAT_TAG: "a number",
        _NULL_TAG: "empty (null)", _STR_TAG: "a string",
    }.get(node.tag, node.tag)
    return f"{kind} ({node.value!r})"


class Node:
    """A composed YAML node that knows where it came from.

    The typed accessors raise :class:`ConfigError` with the file, the line of
    the node and its dotted field path, so schema code never formats errors.
    """

    def __init__(self, node: yaml.Node, file: str, path: str) -> None:
        self._node = node
        self.file = file
        self.path = path

    @property
    def line(self) -> int:
        return self._node.start_mark.line + 1

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.file, self.line, self.path, message)

    def _child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    # -- containers -------------------------------------------------------

    def mapping(self, *, required: Iterable[str] = (), optional: Iterable[str] = (),
                free: bool = False) -> dict[str, Node]:
        """The mapping's items by key; unknown, missing or repeated keys are errors.

        With ``free=True`` any key is accepted (a mapping of names to things);
        repeated keys are still refused.
        """
        if not isinstance(self._node, yaml.MappingNode):
            raise self.error(f"must be a mapping, not {_describe(self._node)}")
        required = set(required)
        allowed = required | set(optional)
        out: dict[str, Node] = {}
        for key_node, value_node in self._node.value:
            key_at = Node(key_node, self.file, self.path)
            # YAML 1.1 reads a bare `on:` as the boolean true; as a key of
            # ours it is the word (as in GitHub's and Gitea's workflows).
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == "on" \
                    and not key_node.style:
                key_node = yaml.ScalarNode(_STR_TAG, "on", key_node.start_mark,
                                           key_node.end_mark)
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
                raise key_at.error(f"keys must be plain strings, not {_describe(key_node)}")
            key = key_node.value
            child = Node(value_node, self.file, self._child_path(key))
            if key in out:
                raise ConfigError(
                    self.file, key_at.line, child.path,
                    f"duplicate key (first at line {out[key].line})",
                )
            if not free and key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(self.file, key_at.line, child.path,
                                  f"unknown key; known keys here: {known}")
            out[key] = child
        missing = sorted(required - out.keys())
        if missing:
            raise self.error(f"missing required key {', '.join(missing)}")
        return out

    def sequence(self) -> list[Node]:
        if not isinstance(self._node, yaml.SequenceNode):
            raise self.error(f"must be a list, not {_describe(self._node)}")
        return [Node(n, self.file, self._child_path(i)) for i, n in enumerate(self._node.value)]

    # -- scalars ------------------------------------------------------------

    def _scalar(self) -> yaml.ScalarNode:
        if not isinstance(self._node, yaml.ScalarNode):
            raise self.error(f"must be a single value, not {_describe(self._node)}")
        return self._node

    def is_null(self) -> bool:
        return isinstance(self._node, yaml.ScalarNode) and self._node.tag == _NULL_TAG

    def is_sequence(self) -> bool:
        return isinstance(self._node, yaml.SequenceNode)

    def is_mapping(self) -> bool:
        return isinstance(self._node, yaml.MappingNode)

    def string(self, *, pattern: re.Pattern[str] | None = None, what: str = "",
               max_len: int = 4096) -> str:
        """A string; YAML 1.1 plain scalars that resolve otherwise are refused.

        ``revision: no`` or ``mode: 0755`` would silently become ``False`` and
        ``493``; we name what it was read as and ask for quotes instead.
        """
        node = self._scalar()
        if node.tag != _STR_TAG:
            raise self.error(
                f"must be a string, but YAML reads the unquoted {node.value!r} as "
                f"{_describe(node).split(' (')[0]}; write it in quotes: \"{node.value}\""
            )
        value = str(node.value)
        if "\x00" in value:
            raise self.error("must not contain a NUL character")
        if len(value) > max_len:
            raise self.error(f"longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(f"{value!r} is not {what or 'valid'}")
        return value

    def boolean(self) -> bool:
        """Only ``true`` and ``false``: YAML 1.1's yes/no/on/off are refused."""
        node = self._scalar()
        if node.tag != _BOOL_TAG or node.value.lower() not in ("true", "false"):
            raise self.error(f"must be true or false, not {_describe(node)}")
        return node.value.lower() == "true"

    def integer(self, *, minimum: int | None = None, maximum: int | None = None) -> int:
        node = self._scalar()
        if node.tag != _INT_TAG or not re.fullmatch(r"[-+]?[0-9]+", node.value):
            raise self.error(f"must be a whole decimal number, not {_describe(node)}")
        value = int(node.value, 10)
        if minimum is not None and value < minimum:
            raise self.error(f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be at most {maximum}, not {value}")
        return value

    def name(self) -> str:
        """A name that may become a path component or a docker name."""
        value = self.string(pattern=names.NAME, what=names.NAME_HELP, max_len=64)
        if ".." in value:
            raise self.error(f"{value!r} is not {names.NAME_HELP}")
        return value

    def image_ref(self) -> str:
        return self.string(pattern=names.IMAGE_REF, what=names.IMAGE_REF_HELP, max_len=255)

    def duration(self, *, zero: bool = False) -> int:
        """Seconds, from 90, 90s, 15m, 1h30m or 7d (0 only if ``zero``)."""
        text = self.raw_scalar()
        seconds = names.parse_duration(text)
        if seconds is None or seconds < 0 or (seconds == 0 and not zero):
            raise self.error(f"must be a duration such as 90s, 15m, 1h30m or 7d, not {text!r}")
        return seconds

    def size(self) -> int:
        """Bytes, from 512, 64K, 100MiB or 2GiB."""
        text = self.raw_scalar()
        size = names.parse_size(text)
        if size is None or size <= 0:
            raise self.error(f"must be a size such as 512MiB or 2GiB, not {text!r}")
        return size

    def raw_scalar(self) -> str:
        """The scalar's text as written, whatever YAML would resolve it to."""
        return str(self._scalar().value)

    def plain_value(self) -> object:
        """The node as plain Python data, with scalars typed by YAML's rules.

        Used where a value's exact JSON form matters (worktree volume hashes)
        after the schema has checked every field's type.
        """
        return yaml.constructor.SafeConstructor().construct_object(self._node, deep=True)
