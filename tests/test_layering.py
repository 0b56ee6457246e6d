"""The package's layering (design.md, "Imports point one way"; README, "Architecture"), checked on the source.

Layers, lowest first; a module may import its own layer and the ones below, never one above:

  0  errors                                     the user-error classes
  1  registry, config, utils, run_folder, dist, leaf modules: registries, the config schema, atomic writes and
     plugins, progress                          environment info, the run-folder lock, the collectives, plugin
                                                imports (modules, entry points) and their record in a run, the
                                                progress-bar switch
  2  data, models, losses, evaluation           datasets and samplers; backbones and heads; loss functions and the
                                                LOSSES modules; metrics, reports, plots
  3  methods                                    the Method plugins
  4  engine                                     build (names -> plugins), the fit loop, evaluation of a method,
                                                checkpoints, inference, features, bench
  5  cli, __main__, the package root            parse, call, print

The package root (``longtail/__init__.py``) imports nothing when it runs (its public names load on first use), so
``from longtail import __version__`` is allowed anywhere. Imports are read with ``ast``: module-level ones,
function-local ones (a lazy import is still a dependency) and ``if TYPE_CHECKING:`` ones (for the layer order only).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "longtail"
HELPER = Path(__file__).resolve().parent / "helpers" / "import_each.py"

LAYERS: dict[str, int] = {
    "longtail.errors": 0,
    "longtail.registry": 1,
    "longtail.config": 1,
    "longtail.utils": 1,
    "longtail.run_folder": 1,
    "longtail.dist": 1,
    "longtail.plugins": 1,  # imports errors, and registry (function-local)
    "longtail.progress": 1,
    "longtail.data": 2,
    "longtail.models": 2,
    "longtail.losses": 2,  # above the leaves (registry, config), below the methods that train with them
    "longtail.evaluation": 2,
    "longtail.methods": 3,
    "longtail.engine": 4,
    "longtail.cli": 5,
    "longtail.__main__": 5,
    "longtail": 5,  # the package root
}
ANYWHERE = {("longtail", "__version__")}  # (module, name) any layer may import


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def layer_of(module: str) -> int | None:
    """The layer of the longest LAYERS prefix of ``module`` (longtail.engine.fit -> engine's)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def imports_of(path: Path) -> list[dict]:
    """Every longtail import in a file: {target module, names, line, local (inside a function), type_only}."""
    out: list[dict] = []

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                visit(child, local, True)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "longtail":
                        out.append({"target": a.name, "names": [], "line": child.lineno, "local": local,
                                    "type_only": type_only})
            elif isinstance(child, ast.ImportFrom) and (child.module or "").split(".")[0] == "longtail":
                assert child.level == 0, f"{path}:{child.lineno}: a relative import; write longtail.X"
                for a in child.names:
                    sub = f"{child.module}.{a.name}"  # `from longtail.data import samplers` imports a module
                    target, names = (sub, []) if sub in MODULES else (child.module, [a.name])
                    out.append({"target": target, "names": names, "line": child.lineno, "local": local,
                                "type_only": type_only})
            visit(child, local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda), type_only)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return out


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"place these modules in LAYERS (tests/test_layering.py) and the README: {missing}"
    assert len(MODULES) > 30  # the walk found the package


def test_a_lower_layer_never_imports_a_higher_one():
    bad = []
    for module, path in MODULES.items():
        for imp in imports_of(path):
            if imp["target"] not in MODULES:
                bad.append(f"{module}:{imp['line']} imports {imp['target']}, which does not exist")
                continue
            if all((imp["target"], n) in ANYWHERE for n in imp["names"]) and imp["names"]:
                continue
            if layer_of(imp["target"]) > layer_of(module):
                kind = "a type-only" if imp["type_only"] else "a function-local" if imp["local"] else "an"
                bad.append(f"{module}:{imp['line']} (layer {layer_of(module)}) has {kind} import of "
                           f"{imp['target']} (layer {layer_of(imp['target'])})")
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_the_losses_stand_on_the_leaves_and_the_models_only():
    """Losses sit above the leaf modules and beside the models, below the methods: no data, evaluation or method
    code in a loss (a method trains with a loss; a loss never knows which method)."""
    allowed = ("longtail.errors", "longtail.registry", "longtail.config", "longtail.models", "longtail.losses")
    losses = [m for m in MODULES if m.startswith("longtail.losses")]
    bad = [f"{m}:{i['line']} imports {i['target']}" for m in losses for i in imports_of(MODULES[m])
           if not i["target"].startswith(allowed)]
    assert len(losses) >= 2 and not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles_counting_function_local_imports():
    graph = {m: {i["target"] for i in imports_of(p) if not i["type_only"] and i["target"] in MODULES} - {m}
             for m, p in MODULES.items()}
    assert _cycles(graph) == []
    # the check itself sees a cycle: config -> data (as config.validate once did) -> config
    assert _cycles({**graph, "longtail.config": graph["longtail.config"] | {"longtail.data"}})


def test_the_package_root_imports_nothing_when_it_runs():
    runtime = [i for i in imports_of(MODULES["longtail"]) if not i["type_only"]]
    assert runtime == []  # the public names are loaded by __getattr__ on first use
    import longtail

    assert sorted(longtail.__all__) == sorted(["__version__", *longtail._API])
    assert longtail.load_config is __import__("longtail.engine.build", fromlist=["x"]).load_config


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per module (POSIX)")
def test_every_module_imports_on_its_own():
    """Each module imported first in a process of its own (forked after the third-party libraries only, see
    tests/helpers/import_each.py): no module depends on another having been imported before it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    names = [m for m in MODULES if m != "longtail.__main__"]  # a script: importing it runs the CLI
    res = subprocess.run([sys.executable, str(HELPER), *names], capture_output=True, text=True, env=env, timeout=900)
    failures = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert not failures, "\n\n".join(f"{f['module']}:\n{f['error']}" for f in failures)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("module", ["longtail", "longtail.errors", "longtail.registry", "longtail.config",
                                    "longtail.cli"])
def test_the_light_modules_load_no_torch(module):
    res = _fresh(f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                 f"('torch', 'torchvision', 'numpy', 'longtail')))")
    assert res.returncode == 0, res.stderr
    loaded = eval(res.stdout)  # a list of module names
    assert not [m for m in loaded if not m.startswith("longtail")], f"{module} loads {loaded}"
    assert not any(m.startswith(("longtail.engine", "longtail.methods", "longtail.data")) for m in loaded)


def test_help_and_list_load_no_torch():
    code = ("import sys\nfrom longtail.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HELP', 'torch' in sys.modules)\nmain(['list'])\nprint('LIST', 'torch' in sys.modules)")
    res = _fresh(code)
    assert res.returncode == 0, res.stderr
    assert "HELP False" in res.stdout and "LIST False" in res.stdout
    assert "methods:" in res.stdout and "  dlsa " in res.stdout and "configs (longtail train NAME):" in res.stdout


def test_the_catalogue_longtail_list_prints_is_what_the_registries_hold():
    import longtail.engine.build  # noqa: F401  (imports every plugin)
    from longtail import registry

    static = registry.catalogue()
    for var in ("DATASETS", "BACKBONES", "HEADS", "LOSSES", "METHODS", "SAMPLERS"):
        reg = getattr(registry, var)
        live = {n: d for n, d in reg.describe().items()  # a prefix family (timm/<name>) has no object of its own
                if n.endswith("/<name>") or reg.get(n).__module__.startswith("longtail.")}
        assert list(static[var].items()) == list(live.items()), var  # the same entries, in describe()'s order
