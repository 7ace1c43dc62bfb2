"""Build the plugin manager: built-ins, then installed entry points, then a recipe's ``plugins:`` modules.

Everything that goes wrong while loading names the plugin, its module and its distribution:
an import failure, a misspelled hook implementation, a duplicate component name, or a hook that raises.

Environment variables (as in pytest and tox):

* ``OPD_DISABLE_PLUGIN_AUTOLOAD=1``: do not load entry points (built-ins and explicit modules still load).
* ``OPD_DISABLE_PLUGINS=a,b``: skip these plugins (matched against the entry-point name, the module, or the
  distribution name).
"""

from __future__ import annotations

import difflib
import importlib
import os

from collections.abc import Iterable, Sequence
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from opd_plugins import hookspecs
from opd_plugins.markers import PROJECT, __version__
from opd_plugins.errors import OPDError, PluginError, PluginLoadError
from opd_plugins.registry import ComponentRegistry, PluginInfo

ENTRYPOINT_GROUP = "opd_plugins"
HOOK_PREFIX = "opd_"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "opd_plugins.teachers",
    "opd_plugins.divergences",
    "opd_plugins.token_weighting",
    "opd_plugins.advantages",
    "opd_plugins.samplers",
    "opd_plugins.rollout",
    "opd_plugins.schedules",
    "opd_plugins.tasks",
    "opd_plugins.runs",
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def disabled_plugins() -> set[str]:
    return {p.strip() for p in os.environ.get("OPD_DISABLE_PLUGINS", "").split(",") if p.strip()}


class OPDPluginManager(pluggy.PluginManager):
    """A pluggy manager that knows where each plugin came from and builds the component registry."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._registry: ComponentRegistry | None = None
        self._bad_names: list[str] = []

    # -- hookimpl discovery: only ``opd_`` functions are hooks --------------------------------------------
    def parse_hookimpl_opts(self, plugin: Any, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None and not name.startswith(HOOK_PREFIX):
            self._bad_names.append(name)
            return None
        return opts if name.startswith(HOOK_PREFIX) else None

    # -- loading -----------------------------------------------------------------------------------------
    def load_module(self, module: str | ModuleType, info: PluginInfo | None = None) -> PluginInfo:
        """Import (if needed) and register one plugin module, then check its hook implementations."""
        module_name = module if isinstance(module, str) else module.__name__
        if info is None:
            dist, version = _distribution_of(module_name)
            info = PluginInfo(name=module_name, module=module_name, dist=dist, version=version)
        if info.name in self.infos:
            return self.infos[info.name]
        if isinstance(module, str):
            try:
                module = importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any import failure is reported with the plugin's name
                raise PluginLoadError(
                    f"error importing plugin {info.name!r} ({info.module}"
                    f"{', ' + info.label if info.dist else ''}): {type(exc).__name__}: {exc}"
                ) from exc
        self._bad_names = []
        if any(callable(v) and hasattr(v, f"{PROJECT}_spec") for v in vars(module).values()):
            self.add_hookspecs(module)  # a plugin may define new hooks for other plugins to implement
        self.register(module, name=info.name)
        problems = [f"{n!r} is marked as a hook implementation but does not start with {HOOK_PREFIX!r}" for n in self._bad_names]
        spec_names = sorted(n for n in dir(self.hook) if n.startswith(HOOK_PREFIX) and self.hook.__dict__[n].has_spec())
        for caller in self.get_hookcallers(module) or []:
            if not caller.has_spec():
                close = difflib.get_close_matches(caller.name, spec_names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                problems.append(f"{caller.name!r} is not a known hook.{hint}")
        if problems:
            self.unregister(module)
            raise PluginLoadError(
                f"plugin {info.name!r} ({info.label}) has invalid hook implementations: " + " ".join(problems)
            )
        self.infos[info.name] = info
        self._registry = None
        return info

    def load_builtins(self) -> None:
        skip = disabled_plugins()
        for module in BUILTIN_PLUGINS:
            if module in skip:
                continue
            self.load_module(module, PluginInfo(module, module, "opd-plugins", __version__))

    def load_entrypoints(self) -> None:
        skip = disabled_plugins()
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRYPOINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if (ep.name, ep.value) in seen or {ep.name, ep.value, dist or ""} & skip:
                continue
            seen.add((ep.name, ep.value))
            info = PluginInfo(name=ep.name, module=ep.value, dist=dist, version=version)
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001
                raise PluginLoadError(
                    f"error importing plugin {ep.name!r} ({ep.value}, {info.label}): {type(exc).__name__}: {exc}"
                ) from exc
            self.load_module(module, info)

    def load_plugins(self, modules: Iterable[str]) -> None:
        skip = disabled_plugins()
        for module in modules:
            if module not in skip:
                self.load_module(module)

    # -- components ----------------------------------------------------------------------------------------
    @property
    def registry(self) -> ComponentRegistry:
        """The component registry, built from every plugin's ``opd_register_components``."""
        if self._registry is None:
            registry = ComponentRegistry()
            for impl in self.hook.opd_register_components.get_hookimpls():
                info = self.infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name, impl.plugin_name)
                try:
                    classes = impl.function()
                except Exception as exc:  # noqa: BLE001
                    raise PluginLoadError(
                        f"plugin {info.name!r} ({info.label}) raised in opd_register_components: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if classes is None:
                    continue
                if not isinstance(classes, (list, tuple)):
                    raise PluginLoadError(
                        f"plugin {info.name!r} ({info.label}): opd_register_components must return a list of "
                        f"component classes, got {type(classes).__name__}"
                    )
                for cls in classes:
                    registry.register(cls, info)
            self._registry = registry
        return self._registry

    # -- calling hooks -------------------------------------------------------------------------------------
    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a lifecycle hook; an exception inside an implementation becomes a PluginError naming it."""
        caller = getattr(self.hook, hook_name)
        if not caller.get_hookimpls():
            return []
        try:
            return caller(**kwargs)
        except OPDError:
            raise
        except Exception as exc:  # noqa: BLE001
            culprit = self._culprit(caller, exc)
            raise PluginError(
                f"plugin {culprit} raised in hook {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc

    def _culprit(self, caller: Any, exc: BaseException) -> str:
        codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
        name = None
        tb = exc.__traceback__
        while tb is not None:
            name = codes.get(tb.tb_frame.f_code, name)
            tb = tb.tb_next
        if name is None:
            return "<unknown>"
        info = self.infos.get(name)
        return f"{name!r} ({info.label})" if info else repr(name)

    def plugin_versions(self) -> list[dict[str, str | None]]:
        """Loaded plugins with their distributions and versions (written into every run directory)."""
        return [
            {"name": i.name, "module": i.module, "dist": i.dist, "version": i.version} for i in self.infos.values()
        ]


def _distribution_of(module_name: str) -> tuple[str | None, str | None]:
    top = module_name.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top) or []
    except Exception:  # noqa: BLE001 - best effort only
        dists = []
    if not dists:
        return None, None
    try:
        return dists[0], metadata.version(dists[0])
    except metadata.PackageNotFoundError:
        return dists[0], None


def get_plugin_manager(
    plugins: Sequence[str] = (), *, entrypoints: bool | None = None, builtins: bool = True
) -> OPDPluginManager:
    """Build a fresh plugin manager (no global state).

    :param plugins: extra importable module names (a recipe's ``plugins:`` list), loaded last.
    :param entrypoints: load installed plugins from the ``opd_plugins`` entry-point group; defaults to True
        unless ``OPD_DISABLE_PLUGIN_AUTOLOAD`` is set.
    :param builtins: load the built-in components (tests may switch this off).
    """
    pm = OPDPluginManager()
    if builtins:
        pm.load_builtins()
    if entrypoints is None:
        entrypoints = not _truthy(os.environ.get("OPD_DISABLE_PLUGIN_AUTOLOAD"))
    if entrypoints:
        pm.load_entrypoints()
    pm.load_plugins(plugins)
    return pm


__all__ = ["BUILTIN_PLUGINS", "ENTRYPOINT_GROUP", "OPDPluginManager", "get_plugin_manager", "disabled_plugins"]
