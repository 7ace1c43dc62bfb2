"""Build the plugin manager: built-ins, then installed entry points, then a recipe's ``plugins:`` modules.

Everything that goes wrong while loading names the plugin, its module and its distribution: an import failure
(``SystemExit`` at import included), a misspelled hook implementation, a duplicate component name, or a hook that
raises. Hook implementations are checked against the hook specifications once everything is loaded (pluggy's
``check_pending``), so a plugin may implement a hook that a plugin loaded after it defines.

An installed plugin that is broken does not break every command: ``opd-plugins list`` lists the others and shows the
broken one; ``validate`` and ``train`` refuse to start, naming it, with the remedy ``OPD_DISABLE_PLUGINS=<name>``.

Environment variables (as in pytest and tox):

* ``OPD_DISABLE_PLUGIN_AUTOLOAD=1``: do not load entry points (built-ins and explicit modules still load).
* ``OPD_DISABLE_PLUGINS=a,b``: block these plugins (matched against the entry-point name, the module, or the
  distribution name), through pluggy's blocking.
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
from opd_plugins.errors import OPDError, PluginError, PluginLoadError
from opd_plugins.markers import PROJECT, __version__
from opd_plugins.registry import ComponentRegistry, PluginInfo

ENTRYPOINT_GROUP = "opd_plugins"
HOOK_PREFIX = "opd_"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "opd_plugins.teachers",
    "opd_plugins.divergences",
    "opd_plugins.token_weighting",
    "opd_plugins.advantages",
    "opd_plugins.samplers",
    "opd_plugins.prompt_selection",
    "opd_plugins.rollout",
    "opd_plugins.schedules",
    "opd_plugins.tasks",
    "opd_plugins.runs",
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def disabled_plugins() -> set[str]:
    return {p.strip() for p in os.environ.get("OPD_DISABLE_PLUGINS", "").split(",") if p.strip()}


def _remedy(name: str) -> str:
    return f"disable it with OPD_DISABLE_PLUGINS={name} (or uninstall it), or run with --traceback to see where it fails"


class OPDPluginManager(pluggy.PluginManager):
    """A pluggy manager that knows where each plugin came from and builds the component registry.

    ``broken`` maps installed plugins that failed to load (or to register their components) to the error; they are
    left out, and :meth:`raise_if_broken` turns them into one :class:`PluginLoadError` for commands that need every
    plugin.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.broken: dict[str, str] = {}
        self._registry: ComponentRegistry | None = None
        self._bad_names: list[str] = []
        self._entrypoint_names: set[str] = set()
        for name in disabled_plugins():
            self.set_blocked(name)

    # -- hookimpl discovery: only ``opd_`` functions are hooks --------------------------------------------
    def parse_hookimpl_opts(self, plugin: Any, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None and not name.startswith(HOOK_PREFIX):
            self._bad_names.append(name)
            return None
        return opts if name.startswith(HOOK_PREFIX) else None

    def blocked(self, info: PluginInfo) -> bool:
        """Whether ``OPD_DISABLE_PLUGINS`` names this plugin (its name, module or distribution)."""
        return any(self.is_blocked(n) for n in (info.name, info.module, info.dist) if n)

    # -- loading -----------------------------------------------------------------------------------------
    def load_module(self, module: str | ModuleType, info: PluginInfo | None = None, *, check: bool = True,
                    require_hooks: bool = False) -> PluginInfo | None:
        """Import (if needed) and register one plugin module; returns its info, or None when it is blocked.

        ``check`` verifies the hook implementations against the specifications now (see :meth:`check_hooks`);
        :func:`get_plugin_manager` loads everything first and checks once. ``require_hooks`` refuses a module that
        implements no hook and defines none (a recipe's ``plugins:`` entry that would do nothing)."""
        module_name = module if isinstance(module, str) else module.__name__
        if info is None:
            dist, version = _distribution_of(module_name)
            info = PluginInfo(name=module_name, module=module_name, dist=dist, version=version)
        if info.name in self.infos:
            return self.infos[info.name]
        if self.blocked(info):
            return None
        if isinstance(module, str):
            module = _import(module, info)
        self._bad_names = []
        defines_hooks = any(callable(v) and hasattr(v, f"{PROJECT}_spec") for v in vars(module).values())
        if defines_hooks:
            self.add_hookspecs(module)  # a plugin may define new hooks for other plugins to implement
        self.register(module, name=info.name)
        problems = [f"{n!r} is marked as a hook implementation but does not start with {HOOK_PREFIX!r}"
                    for n in self._bad_names]
        if problems:
            self.unregister(module)
            raise PluginLoadError(f"plugin {info.name!r} ({info.label}) has invalid hook implementations: "
                                  + " ".join(problems))
        if require_hooks and not defines_hooks and not self.get_hookcallers(module):
            self.unregister(module)
            raise PluginLoadError(f"plugin {info.name!r} ({info.label}) implements no opd_ hook and defines none, so "
                                  "loading it does nothing: is it the right module? (hook implementations are "
                                  "functions named opd_<hook> marked with @opd_plugins.hookimpl)")
        self.infos[info.name] = info
        self._registry = None
        if check:
            self.check_hooks()
        return info

    def check_hooks(self, *, raise_errors: bool = True) -> dict[str, str]:
        """pluggy's ``check_pending`` with our wording: every hook implementation must match a hook specification
        (a did-you-mean for a misspelt one). The offending plugins are unregistered; an installed one becomes
        ``broken``; for the others a :class:`PluginLoadError` is raised (or, with ``raise_errors=False``, their
        messages are returned by plugin name)."""
        spec_names = sorted(n for n in dir(self.hook) if n.startswith(HOOK_PREFIX) and self.hook.__dict__[n].has_spec())
        by_plugin: dict[str, list[str]] = {}
        for name in list(self.hook.__dict__):
            if not name.startswith(HOOK_PREFIX):
                continue
            caller = getattr(self.hook, name)
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                close = difflib.get_close_matches(name, spec_names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                by_plugin.setdefault(impl.plugin_name, []).append(f"{name!r} is not a known hook.{hint}")
        errors: dict[str, str] = {}
        for plugin_name, problems in by_plugin.items():
            info = self.infos.get(plugin_name) or PluginInfo(plugin_name, plugin_name)
            message = f"plugin {info.name!r} ({info.label}) has invalid hook implementations: " + " ".join(problems)
            plugin = self.get_plugin(plugin_name)
            if plugin is not None:
                self.unregister(plugin)
            self.infos.pop(plugin_name, None)
            self._registry = None
            if plugin_name in self._entrypoint_names:
                self.broken[plugin_name] = f"{message}; {_remedy(plugin_name)}"
            else:
                errors[plugin_name] = message
        if errors and raise_errors:
            raise PluginLoadError("; ".join(errors.values()))
        return errors

    def load_builtins(self) -> None:
        for module in BUILTIN_PLUGINS:
            self.load_module(module, PluginInfo(module, module, "opd-plugins", __version__), check=False)

    def load_entrypoints(self) -> None:
        """Load the installed plugins; one that fails is recorded in ``broken`` (named, with the remedy), not
        raised, so the others still load."""
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRYPOINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            info = PluginInfo(name=ep.name, module=ep.value, dist=dist, version=version)
            if (ep.name, ep.value) in seen or self.blocked(info):
                continue
            seen.add((ep.name, ep.value))
            self._entrypoint_names.add(ep.name)
            try:
                self.load_module(_import(ep, info), info, check=False)
            except PluginLoadError as exc:
                self.broken[ep.name] = f"{exc}; {_remedy(ep.name)}"

    def load_plugins(self, modules: Iterable[str], *, check: bool = True) -> list[PluginInfo]:
        """Load explicit plugin modules (a recipe's ``plugins:``), then check their hooks once."""
        infos = [info for module in modules if (info := self.load_module(module, check=False, require_hooks=True))]
        if check:
            self.check_hooks()
        return infos

    def raise_if_broken(self) -> None:
        """A :class:`PluginLoadError` naming every broken installed plugin and how to disable it."""
        if self.broken:
            raise PluginLoadError("installed plugin(s) failed to load: " + "; ".join(
                f"{name!r}: {msg}" for name, msg in self.broken.items()))

    # -- components ----------------------------------------------------------------------------------------
    @property
    def registry(self) -> ComponentRegistry:
        """The component registry, built from every plugin's ``opd_register_components``.

        Results are attributed to their plugin by calling each implementation directly (pluggy has no
        per-implementation result attribution, pluggy issue #235). An installed plugin whose registration fails
        is recorded as ``broken`` and left out; a built-in's or an explicit plugin's failure raises."""
        if self._registry is None:
            registry = ComponentRegistry()
            for impl in self.hook.opd_register_components.get_hookimpls():
                info = self.infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name, impl.plugin_name)
                try:
                    classes = impl.function()
                    if classes is None:
                        continue
                    if not isinstance(classes, (list, tuple)):
                        raise PluginLoadError(
                            f"plugin {info.name!r} ({info.label}): opd_register_components must return a list of "
                            f"component classes, got {type(classes).__name__}")
                    for cls in classes:
                        registry.register(cls, info)
                except Exception as exc:  # noqa: BLE001 - named and either recorded or raised
                    message = exc if isinstance(exc, PluginLoadError) else PluginLoadError(
                        f"plugin {info.name!r} ({info.label}) raised in opd_register_components: "
                        f"{type(exc).__name__}: {exc}")
                    if impl.plugin_name in self._entrypoint_names:
                        self.broken[impl.plugin_name] = f"{message}; {_remedy(impl.plugin_name)}"
                        registry.forget(info)
                        continue
                    raise message from exc
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
                f"plugin {culprit} raised in hook {hook_name}: {type(exc).__name__}: {exc} (run with --traceback, "
                "or OPD_TRACEBACK=1, to see where)"
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


def _import(module: Any, info: PluginInfo) -> ModuleType:
    """Import a plugin module (a name, or an entry point); any failure, ``sys.exit()`` included, is a
    :class:`PluginLoadError` naming the plugin."""
    where = f"{info.module}, {info.label}" if info.dist else info.module
    try:
        return module.load() if hasattr(module, "load") else importlib.import_module(module)
    except SystemExit as exc:
        raise PluginLoadError(f"plugin {info.name!r} ({where}) called sys.exit({exc.code!r}) while being imported; "
                              "a plugin module must not exit the process") from None
    except Exception as exc:  # noqa: BLE001 - any import failure is reported with the plugin's name
        hint = ""
        top = info.module.split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name == top and (
                os.path.exists(f"{top}.py") or os.path.isdir(top)):
            hint = (f" ({top} is in the current directory, which is not on the import path: run with "
                    "PYTHONPATH=. or install it)")
        raise PluginLoadError(f"error importing plugin {info.name!r} ({where}): {type(exc).__name__}: {exc}{hint}") \
            from exc


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
    plugins: Sequence[str] = (), *, entrypoints: bool | None = None, builtins: bool = True, strict: bool = True
) -> OPDPluginManager:
    """Build a fresh plugin manager (no global state): built-ins, entry points, ``plugins``; hooks checked once.

    :param plugins: extra importable module names (a recipe's ``plugins:`` list), loaded last.
    :param entrypoints: load installed plugins from the ``opd_plugins`` entry-point group; defaults to True
        unless ``OPD_DISABLE_PLUGIN_AUTOLOAD`` is set.
    :param builtins: load the built-in components (tests may switch this off).
    :param strict: raise when an installed plugin is broken (``False``: keep it in ``pm.broken`` and go on, as
        ``opd-plugins list`` does).
    """
    pm = OPDPluginManager()
    if builtins:
        pm.load_builtins()
    if entrypoints is None:
        entrypoints = not _truthy(os.environ.get("OPD_DISABLE_PLUGIN_AUTOLOAD"))
    if entrypoints:
        pm.load_entrypoints()
    pm.load_plugins(plugins, check=False)
    pm.check_hooks()
    pm.registry  # noqa: B018 - build it now, so a broken registration is found here
    if strict:
        pm.raise_if_broken()
    return pm


__all__ = ["BUILTIN_PLUGINS", "ENTRYPOINT_GROUP", "OPDPluginManager", "get_plugin_manager", "disabled_plugins"]
