"""One small strict registry: names map to code in one place, filled at import time.

A leaf module (no torch): the plugins register themselves with ``@METHODS.register("name")`` when their module is
imported (``longtail.data``, ``longtail.models``, ``longtail.losses``, ``longtail.methods``; ``longtail.engine.build``
imports them all).
``catalogue`` reads the same decorators from the source without importing anything, for ``longtail list``.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from longtail.errors import UserError

T = TypeVar("T")


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line: the description ``longtail list`` prints (a docstring's first
    line alone may stop mid-sentence)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def describe_options(config_cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, doc)`` of each field of a plugin's ``Config`` dataclass, in order; ``doc`` is the
    field's comment in the source (its trailing ``# ...`` and the ``#`` lines just above it), as written there."""
    import dataclasses
    import inspect
    import io
    import textwrap
    import tokenize

    comments: dict[int, str] = {}  # source line (1-based, in the class's own source) -> comment text
    fields_at: dict[str, int] = {}
    try:
        src = textwrap.dedent(inspect.getsource(config_cls))
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = src.splitlines()
        for node in ast.parse(src).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                fields_at[node.target.id] = node.lineno
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError, tokenize.TokenError):
        lines = []
    out = []
    for f in dataclasses.fields(config_cls):
        doc = []
        line = fields_at.get(f.name)
        if line is not None:
            above = line - 1
            while above >= 1 and lines[above - 1].strip().startswith("#"):
                doc.insert(0, comments.get(above, ""))
                above -= 1
            if line in comments and not lines[line - 1].strip().startswith("#"):
                doc.append(comments[line])
        if f.default is not dataclasses.MISSING:
            default = repr(f.default) if isinstance(f.default, str) else str(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = str(f.default_factory())
        else:
            default = "(required)"
        tp = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
        out.append((f.name, tp, default, " ".join(d for d in doc if d)))
    return out


def _canonical(name: str) -> str:
    # `shapes-glt` and `shapes_glt` name the same thing: users type either.
    return name.strip().lower().replace("-", "_")


class RegistryError(UserError, KeyError):
    """Unknown or duplicate name. The message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps lower_snake names to factories. Duplicate names raise; unknown names suggest close matches.
    ``default``: the name a caller uses when the user names none (``get_default``)."""

    def __init__(self, kind: str, default: str | None = None) -> None:
        self.kind = kind
        self.default = default
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._prefixes: dict[str, tuple[Callable[[str], T], str]] = {}  # "timm/" -> (name -> factory, help)

    def register_prefix(self, prefix: str, resolve: Callable[[str], T], help: str = "") -> None:
        """Names ``PREFIX<rest>`` resolve to ``resolve(rest)`` (a whole family from another library, e.g.
        ``timm/<model>``); ``rest`` is passed as typed. ``resolve`` raises for a ``rest`` it does not know."""
        if prefix in self._prefixes:
            raise RegistryError(f"{self.kind} prefix '{prefix}' is already registered")
        self._prefixes[prefix] = (resolve, help)

    def _prefixed(self, name: str) -> tuple[Callable[[str], T], str] | None:
        for prefix, (resolve, _) in self._prefixes.items():
            if name.strip().startswith(prefix):
                return resolve, name.strip()[len(prefix):]
        return None

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        key = _canonical(name)

        def deco(obj: T) -> T:
            if key in self._items:
                raise RegistryError(f"{self.kind} '{key}' is already registered")
            self._items[key] = obj
            doc = help or summary(getattr(obj, "__doc__", None))
            self._help[key] = doc
            return obj

        return deco

    @contextlib.contextmanager
    def temporarily(self, name: str, obj: T, help: str = "") -> Iterator[T]:
        """Register ``obj`` as ``name`` for the ``with`` block only (a test's own plugin), then remove it again, so
        the registry holds after the block exactly what it held before."""
        self.register(name, help)(obj)
        try:
            yield obj
        finally:
            del self._items[_canonical(name)], self._help[_canonical(name)]

    def get(self, name: str) -> T:
        if (hit := self._prefixed(name)) is not None:
            resolve, rest = hit
            return resolve(rest)
        key = _canonical(name)
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            fams = "".join(f", {p}<name>" for p in self._prefixes)
            raise RegistryError(
                f"unknown {self.kind} '{name}'{hint} (known: {', '.join(sorted(self._items))}{fams})"
            )
        return self._items[key]

    def get_default(self) -> T:
        """The entry registered as ``default`` (RegistryError when there is none)."""
        if self.default is None:
            raise RegistryError(f"no default {self.kind}")
        return self.get(self.default)

    def __contains__(self, name: str) -> bool:
        return _canonical(name) in self._items or self._prefixed(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def describe(self) -> dict[str, str]:
        """name -> one-line description, for `longtail list`."""
        out = {k: self._help[k] for k in sorted(self._items)}
        out.update({f"{p}<name>": h for p, (_, h) in self._prefixes.items()})
        return out


DATASETS: Registry = Registry("dataset")
BACKBONES: Registry = Registry("backbone")
HEADS: Registry = Registry("head")
METHODS: Registry = Registry("method")
# Losses (``longtail.losses``): modules of a loss function and its per-class constants, which the methods of the same
# names train with and IFL / mixup take by name (``base:``).
LOSSES: Registry = Registry("loss")
SAMPLERS: Registry = Registry("sampler")
# Measures of a trained run's features (``longtail eval RUN --feature-quality`` runs the default, DLSA's flow filter):
# classes with a ``Config`` dataclass of options and
# ``evaluate(train_feats, train_labels, test_feats, test_labels, num_classes, thresholds, cfg)``.
FEATURE_EVALUATIONS: Registry = Registry("feature evaluation", default="flow_filter")


def catalogue(root: Path | None = None) -> dict[str, dict[str, str]]:
    """``{registry: {name: one-line help}}`` of every ``@REGISTRY.register("name"[, help])`` decorator and every
    ``REGISTRY.register_prefix("prefix/", resolve[, help])`` call in the package's source (``root``: the
    ``longtail`` folder), read with ``ast``: the registries' ``describe()`` as they are once the plugins are
    imported (names sorted, then the ``prefix/<name>`` families), without importing them (and torch), so
    ``longtail list`` starts at once. Keys are the registries' variable names (``METHODS``);
    tests/test_layering.py checks that it equals the live registries."""

    def text(args: list[ast.expr], keywords: list[ast.keyword]) -> str:
        given = [*args, *(k.value for k in keywords if k.arg == "help")]
        return given[0].value if given and isinstance(given[0], ast.Constant) else ""

    root = Path(__file__).resolve().parent if root is None else root
    items: dict[str, dict[str, str]] = {}
    families: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                for deco in node.decorator_list:
                    if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                            and deco.func.attr == "register" and isinstance(deco.func.value, ast.Name)
                            and deco.args and isinstance(deco.args[0], ast.Constant)):
                        doc = text(deco.args[1:2], deco.keywords)
                        doc = doc or summary(ast.get_docstring(node))  # as register() does
                        items.setdefault(deco.func.value.id, {})[_canonical(deco.args[0].value)] = doc
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "register_prefix" and isinstance(node.func.value, ast.Name)
                  and node.args and isinstance(node.args[0], ast.Constant)):
                families.setdefault(node.func.value.id, {})[f"{node.args[0].value}<name>"] = text(node.args[2:3],
                                                                                                  node.keywords)
    return {reg: {**dict(sorted(items.get(reg, {}).items())), **families.get(reg, {})}
            for reg in sorted(items.keys() | families.keys())}
