"""Reading recipe YAML safely: bounded size, depth and alias expansion, no duplicate keys, UTF-8 only.

``yaml.safe_load`` builds no arbitrary objects, but it still accepts inputs that hurt later: an alias bomb (a few
hundred bytes whose anchors expand to billions of nodes once something walks the result), a mapping that repeats a
key (silently last-wins), a flow collection nested thousands deep (``RecursionError``), a file in UTF-16 or
Latin-1 (``UnicodeDecodeError``), a 50 MB file that takes a minute to parse. :class:`RecipeLoader` refuses each of
them with a :class:`YAMLLimitError` that names the line, and :func:`read_text` refuses the encodings and the size
before parsing. Numbers are read the YAML 1.2 way, so ``1e-4`` is the float it looks like (YAML 1.1, PyYAML's
default, needs ``1.0e-4``).

Standard library and PyYAML only: the loader reads recipes without importing anything heavy.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 256 * 1024
"""The largest recipe file read (256 KiB; shipped recipes are about 2 KB)."""
MAX_NODES = 20_000
"""The most YAML nodes a recipe may hold once every alias is expanded."""
MAX_DEPTH = 64
"""The deepest nesting of mappings and sequences."""


class YAMLLimitError(yaml.YAMLError):
    """A YAML input that is well-formed but refused (too big, too deep, an alias bomb, a duplicate key)."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


# YAML 1.2 core-schema floats: an exponent without a dot (1e-4) is a float, as it is in JSON and Python.
_FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the limits above, duplicate keys refused and YAML 1.2 exponent floats."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    # -- composing: depth, then the size every alias expands to -------------------------------------------------
    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            if not self.check_event(yaml.AliasEvent):
                self._nodes += 1
                if self._nodes > MAX_NODES:
                    raise YAMLLimitError(f"holds more than {MAX_NODES:,} values; recipes hold settings, not data "
                                         "(point data.dataset at a data file instead)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        expanded_size(node)
        return node

    # -- constructing: no key twice in one mapping ----------------------------------------------------------------
    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges; keys written here then override the merged ones, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor reports it
                if first is not key_node:
                    raise YAMLLimitError(f"duplicate key {key!r}: first at line {first.start_mark.line + 1}, again at "
                                         f"line {key_node.start_mark.line + 1}; keep one of them",
                                         key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))


def expanded_size(root: Any, limit: int = MAX_NODES) -> int:
    """How many nodes ``root`` holds with every alias expanded; :class:`YAMLLimitError` above ``limit`` or for an
    alias that contains itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YAMLLimitError("an alias refers to a node that contains it (a recursive structure)", node.start_mark)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise YAMLLimitError(f"expands to more than {limit:,} values once its aliases (*name) are expanded "
                                     "(an alias bomb?); write the values out or use fewer aliases", child.start_mark)
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def decode(data: bytes, what: str) -> str:
    """UTF-8 text of ``data`` (a UTF-8 byte-order mark is dropped); ``ValueError`` saying what to do otherwise."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ValueError(f"{what} is UTF-32 encoded; save it as UTF-8")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in data[:4096]:
        raise ValueError(f"{what} is UTF-16 encoded (or binary); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{what} is not valid UTF-8 (byte {data[exc.start]:#04x} at line {line}); save it as "
                         "UTF-8") from None


def read_text(path: str | Path, *, max_bytes: int = MAX_BYTES) -> str:
    """The text of a YAML file, refused by size before it is read whole, and by encoding."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"the file is {size:,} bytes, more than the {max_bytes:,} a recipe may have; recipes hold "
                         "settings, not data (point data.dataset at a data file instead)")
    return decode(path.read_bytes(), "the file")


def load(text: str) -> Any:
    """Parse one YAML document with :class:`RecipeLoader` (raises ``yaml.YAMLError``, never ``RecursionError``)."""
    if len(text) > MAX_BYTES:
        raise YAMLLimitError(f"the text is {len(text):,} characters, more than {MAX_BYTES:,}")
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise YAMLLimitError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None


def describe(exc: yaml.YAMLError) -> str:
    """``at line L, column C: problem`` of a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(exc, 'problem', None) or exc}"


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "RecipeLoader", "YAMLLimitError", "decode", "describe",
           "expanded_size", "load", "read_text"]
