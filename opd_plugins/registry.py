"""ComponentRegistry: every registered component class, by kind and name, with the plugin that provides it."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass

from opd_plugins.components import KINDS, SNAKE_CASE, Component, ComponentParams
from opd_plugins.errors import ComponentNotFound, PluginLoadError


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from: its registered name, module, and distribution (name, version)."""

    name: str
    module: str
    dist: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        """``opd-extra 0.2.1`` when the plugin comes from a distribution, else its module name."""
        if self.dist:
            return f"{self.dist} {self.version}" if self.version else self.dist
        return self.module


@dataclass(frozen=True)
class Entry:
    cls: type[Component]
    plugin: PluginInfo

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")


def component_problems(cls: object) -> list[str]:
    """What is wrong with a class offered as a component (empty when it is well-formed)."""
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        return [f"{cls!r} is not a subclass of opd_plugins.components.Component"]
    problems = []
    if cls.kind not in KINDS:
        problems.append(f"kind {cls.kind!r} is not one of {', '.join(KINDS)} (subclass a kind's base class)")
    if not isinstance(cls.name, str) or not SNAKE_CASE.match(cls.name):
        problems.append(f"name {cls.name!r} is not snake_case")
    if not (cls.__doc__ or "").strip():
        problems.append("has no docstring")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, ComponentParams)):
        problems.append("Params is not a subclass of opd_plugins.components.ComponentParams")
    elif params.model_config.get("extra") != "forbid":
        problems.append('Params must forbid unknown keys (model_config extra="forbid")')
    return problems


class ComponentRegistry:
    """Component classes by kind and name. Duplicates are errors, never silent shadowing."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def register(self, cls: type[Component], plugin: PluginInfo) -> None:
        problems = component_problems(cls)
        if problems:
            raise PluginLoadError(
                f"plugin {plugin.name!r} ({plugin.label}) registers an invalid component {cls!r}: "
                + "; ".join(problems)
            )
        existing = self._entries[cls.kind].get(cls.name)
        if existing is not None:
            if existing.cls is cls:
                return
            raise PluginLoadError(
                f"{cls.kind} {cls.name!r} is registered by both {existing.plugin.label} "
                f"(plugin {existing.plugin.name!r}) and {plugin.label} (plugin {plugin.name!r})"
            )
        self._entries[cls.kind][cls.name] = Entry(cls, plugin)

    def get(self, kind: str, name: str) -> type[Component]:
        return self.entry(kind, name).cls

    def entry(self, kind: str, name: str) -> Entry:
        if kind not in self._entries:
            raise ComponentNotFound(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        try:
            return self._entries[kind][name]
        except KeyError:
            raise ComponentNotFound(self.not_found_message(kind, name)) from None

    def not_found_message(self, kind: str, name: str) -> str:
        names = sorted(self._entries[kind])
        msg = f"unknown {kind} {name!r}."
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        return msg + "\n" + self.choices_line(kind)

    def choices_line(self, kind: str) -> str:
        """``registered: a, b (opd_plugins 0.1.0); c (opd-extra 0.2.1)``"""
        by_plugin: dict[str, list[str]] = {}
        for name, entry in sorted(self._entries[kind].items()):
            by_plugin.setdefault(entry.plugin.label, []).append(name)
        if not by_plugin:
            return f"no {kind} is registered"
        return "registered: " + "; ".join(f"{', '.join(n)} ({label})" for label, n in by_plugin.items())

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def __iter__(self):
        for kind in KINDS:
            yield from self.entries(kind)

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())
