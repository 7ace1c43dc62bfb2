"""ComponentRegistry: every registered component class, by kind and name, with the plugin that provides it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from typing import Any

from pydantic import ValidationError

from opd_plugins.components import KINDS, SNAKE_CASE, Component, ComponentParams, ComponentSpec
from opd_plugins.errors import ComponentNotFound, PluginLoadError, Problem, RecipeError, did_you_mean, pydantic_problems


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

    def forget(self, plugin: PluginInfo) -> None:
        """Drop every component a plugin registered (a plugin whose registration failed half-way)."""
        for entries in self._entries.values():
            for name in [n for n, e in entries.items() if e.plugin.name == plugin.name]:
                del entries[name]

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
        """``unknown divergence 'revers_kl'. Did you mean 'reverse_kl'?`` and the registered choices."""
        return f"unknown {kind} {name!r}.{did_you_mean(str(name), sorted(self._entries[kind]))}\n" + self.choices_line(kind)

    def choices_line(self, kind: str) -> str:
        """``registered: a, b (opd_plugins 0.1.0); c (opd-extra 0.2.1)``"""
        by_plugin: dict[str, list[str]] = {}
        for name, entry in sorted(self._entries[kind].items()):
            by_plugin.setdefault(entry.plugin.label, []).append(name)
        if not by_plugin:
            return f"no {kind} is registered"
        return "registered: " + "; ".join(f"{', '.join(n)} ({label})" for label, n in by_plugin.items())

    def names(self, kind: str) -> list[str]:
        """Registered names of a kind, sorted."""
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        """Every entry (class and plugin) of a kind, sorted by name."""
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    # -- building components from {name, params} specs, nested ones included -----------------------------------
    def resolve(self, kind: str, spec: Any, path: str = "") -> tuple[Component | None, list[Problem]]:
        """Build the component ``spec`` names, with its nested components; returns ``(component, problems)``.

        ``spec`` is a :class:`~opd_plugins.components.ComponentSpec`, a ``{name, params}`` mapping, a name, or a
        ``(name, params)`` pair. Every problem — an unknown name (with did-you-mean and the registered choices),
        invalid params, a nested spec's problems, a constructor's ``ValueError``, the component's own
        :meth:`~opd_plugins.components.Component.problems` — is collected with its dotted YAML path below
        ``path``; the component is None when there is any.
        """
        name, params = _name_and_params(spec)
        where = f"{path}." if path else ""
        if kind not in self._entries:
            return None, [Problem(path, f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")]
        if name not in self._entries[kind]:
            return None, [Problem(f"{where}name", self.not_found_message(kind, name))]
        return self.resolve_class(self.get(kind, name), params, path)

    def resolve_class(self, cls: type[Component], params: Any, path: str = "") -> tuple[Component | None, list[Problem]]:
        """:meth:`resolve` for a given class (registered or not): validate ``params``, build the nested slots the
        class declares (``nested_slots``) from this registry, then the component."""
        where = f"{path}." if path else ""
        if isinstance(params, ComponentParams):
            parsed = params
        else:
            try:
                parsed = cls.Params(**(params or {}))
            except ValidationError as exc:
                return None, pydantic_problems(exc, cls.Params, f"{where}params")
            except (TypeError, ValueError) as exc:
                return None, [Problem(f"{where}params", str(exc))]
        problems: list[Problem] = []
        nested: dict[str, Any] = {}
        for field, nested_kind in cls.nested_slots.items():
            value = getattr(parsed, field, None)
            base = f"{where}params.{field}"
            if value is None:
                continue
            if isinstance(value, dict) and not isinstance(value, ComponentSpec):
                built = {}
                for key, sub in value.items():
                    comp, p = self.resolve(nested_kind, sub, f"{base}.{key}")
                    problems += p
                    built[key] = comp
                nested[field] = built
            elif isinstance(value, (list, tuple)):
                built_list = []
                for i, sub in enumerate(value):
                    comp, p = self.resolve(nested_kind, sub, f"{base}[{i}]")
                    problems += p
                    built_list.append(comp)
                nested[field] = built_list
            else:
                comp, p = self.resolve(nested_kind, value, base)
                problems += p
                nested[field] = comp
        if problems:
            return None, problems
        try:
            component = cls(parsed, nested=nested) if cls.nested_slots else cls(parsed)
        except ValidationError as exc:
            return None, pydantic_problems(exc, cls.Params, f"{where}params")
        except ValueError as exc:
            return None, [Problem(f"{where}params", str(exc))]
        own = [Problem(f"{where}params.{p}" if p else f"{where}params", m) for p, m in component.problems()]
        return (None, own) if own else (component, [])

    def problems(self, kind: str, spec: Any, path: str = "") -> list[Problem]:
        """Every problem of a ``{name, params}`` spec, nested specs included (see :meth:`resolve`)."""
        return self.resolve(kind, spec, path)[1]

    def build(self, kind: str, spec: Any) -> Component:
        """The component ``spec`` names, built with its nested components; an unknown name raises
        :class:`~opd_plugins.errors.ComponentNotFound`, any other problem a :class:`~opd_plugins.errors.RecipeError`
        listing them all."""
        component, problems = self.resolve(kind, spec)
        if component is None:
            if len(problems) == 1 and problems[0].path == "name":
                raise ComponentNotFound(problems[0].message)
            raise RecipeError(problems, source=f"{kind} {_name_and_params(spec)[0]!r}")
        return component

    def __iter__(self):
        for kind in KINDS:
            yield from self.entries(kind)

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())


def _name_and_params(spec: Any) -> tuple[str, Any]:
    """``(name, params)`` of a spec given as a ComponentSpec, a mapping, a name, or a ``(name, params)`` pair
    (params a mapping or an already-validated ``Params`` instance)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec[0], spec[1] or {}
    spec = spec if isinstance(spec, ComponentSpec) else ComponentSpec.model_validate(spec)
    return spec.name, spec.params
