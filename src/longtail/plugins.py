"""Plugins: your own backbones, heads, datasets, samplers and methods, for every command.

A plugin is an importable Python module that registers things when it is imported::

    # my_plugin.py
    from longtail.registry import BACKBONES

    @BACKBONES.register("my_mlp")
    def my_mlp(): ...

It reaches longtail in one of three ways, all of which end in the same import:
  --plugin my_plugin              on any command line (``longtail train --plugin my_plugin ...``)
  plugins: [my_plugin]            in a recipe (``RunConfig.plugins``)
  a ``longtail.plugins`` entry point of an installed package (``[project.entry-points."longtail.plugins"]``
  ``my_plugin = "my_package.longtail_plugin"``), imported whenever a config is resolved
  (``longtail.engine.build.resolve``, before any registered name is looked up).
A value may also be ``module:function``: the module is imported and ``function()`` called once.

A run records the plugins it was trained with in its config.yaml (``plugins``): ``--plugin`` modules, and the
module of every registered component it uses that is not longtail's own (an entry point's, or one a script
imported), so ``eval`` / ``predict`` / ``export`` of the run import them again, and a run whose plugin is
missing says which one it needs.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib import metadata
from typing import Any

from longtail.errors import ConfigError

ENTRY_POINT_GROUP = "longtail.plugins"
log = logging.getLogger("longtail")

_loaded: dict[str, Any] = {}  # spec -> what importing it returned
_entry_points_loaded = False


def load_plugin(spec: str, needed_by: str | None = None) -> Any:
    """Import plugin ``spec`` (``module`` or ``module:function``, calling the function) once; ConfigError in one
    line when it cannot be imported (``needed_by``: who needs it, for the message)."""
    spec = spec.strip()
    if spec in _loaded:
        return _loaded[spec]
    module_name, _, func = spec.partition(":")
    if not module_name or module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        raise ConfigError(f"plugin '{spec}': give an importable module name (my_plugin, my_package.plugin), not a "
                          f"file path; put its folder on PYTHONPATH")
    why = f"; {needed_by} needs it" if needed_by else ""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"plugin '{module_name}' cannot be imported ({e}){why}: install it, or put the folder "
                          f"holding it on PYTHONPATH") from None
    result: Any = module
    if func:
        fn = getattr(module, func, None)
        if not callable(fn):
            raise ConfigError(f"plugin '{spec}': module {module_name} has no function {func}{why}")
        result = fn()
    _loaded[spec] = result
    return result


def load_plugins(specs: list[str] | tuple[str, ...], needed_by: str | None = None) -> None:
    for spec in specs:
        load_plugin(spec, needed_by)


def load_entry_points() -> list[str]:
    """Import every installed ``longtail.plugins`` entry point (once per process); returns their values."""
    global _entry_points_loaded
    values = []
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken installed distribution must not stop longtail
        eps = []
    for ep in eps:
        values.append(ep.value)
        if _entry_points_loaded or ep.value in _loaded:
            continue
        try:
            load_plugin(ep.value, needed_by=f"the installed entry point '{ep.name}' ({ENTRY_POINT_GROUP})")
        except ConfigError as e:  # an installed but broken plugin: say so, and go on without it
            log.warning("%s", e)
    _entry_points_loaded = True
    return values


def reset_entry_points() -> None:
    """Look for entry points again at the next ``load_entry_points`` (after installing a package; tests)."""
    global _entry_points_loaded
    _entry_points_loaded = False


def provider(obj: Any) -> str | None:
    """The module that registered ``obj`` when it is not longtail's own: a plugin to record (``__main__`` too)."""
    module = getattr(obj, "__module__", None)
    if not module or module == "longtail" or module.startswith("longtail."):
        return None
    return module


def components(cfg: Any) -> list[tuple[str, str, Any]]:
    """(kind, name, registered object) of every registered component a RunConfig names."""
    from longtail import registry

    out = [("dataset", cfg.data.name, registry.DATASETS.get(cfg.data.name)),
           ("backbone", cfg.model.backbone, registry.BACKBONES.get(cfg.model.backbone)),
           ("head", cfg.model.head["name"], registry.HEADS.get(cfg.model.head["name"]))]
    for st in cfg.stages:
        out.append(("method", st.method["name"], registry.METHODS.get(st.method["name"])))
        out.append(("sampler", st.sampler, registry.SAMPLERS.get(st.sampler)))
    return out


def record_plugins(cfg: Any) -> list[str]:
    """Add to ``cfg.plugins`` the module of every component of ``cfg`` that a plugin registered, so the run's
    config.yaml names what eval / predict / export must import. Returns warnings for components a script
    registered (``__main__``): those cannot be imported again."""
    notes = []
    plugins = list(cfg.plugins)
    for kind, name, obj in components(cfg):
        module = provider(obj)
        if module is None or any(p.partition(":")[0] == module for p in plugins):
            continue
        if module == "__main__" or module not in sys.modules:
            notes.append(f"{kind} '{name}' is registered by a script ({module}), not an importable module: "
                         f"`longtail eval` / `predict` / `export` of this run will not find it; move it into a "
                         f"module and name that with --plugin MODULE (or plugins: [MODULE] in the recipe)")
            continue
        plugins.append(module)
    cfg.plugins = plugins
    return notes
