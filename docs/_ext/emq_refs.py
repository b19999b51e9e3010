"""Python cross-references that Sphinx cannot resolve, resolved by the code.

The build runs nitpicky (``-n``) with warnings as errors, so every
reference must name something. Sphinx finds only what these pages document
under its full name; this handler is called for the rest and looks the
name up in the code itself (the module and class the reference was written
in, then the name as given):

* a name that is emq-green's, re-exported or imported under another path
  (``Settings`` in ``emq_green.jobmanager``), becomes a link to where these
  pages document it;
* a name that exists but is not documented here (an internal part, or a
  class of another library: the build reaches no network, so there is no
  intersphinx) is shown as code, without a link;
* a name that does not exist is left alone: Sphinx warns, and the build
  fails. A typo or a renamed function in a docstring is caught this way.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
import re
from typing import Any, Optional

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

_MISSING = object()


def _import(dotted: str) -> Any:
    """The object named ``dotted`` (module, class, function, attribute), or _MISSING."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            found = getattr(obj, attr, _MISSING)
            if found is _MISSING:
                rest = parts[i + 1:]
                return attr if not rest and _declared_attribute(obj, attr) else _MISSING
            obj = found
        return obj
    return _MISSING


def _declared_attribute(owner: Any, attr: str) -> bool:
    """An instance attribute of class ``owner``: annotated, in ``__slots__``,
    or assigned as ``self.attr`` in its source."""
    if not inspect.isclass(owner):
        return False
    for klass in owner.__mro__:
        if attr in getattr(klass, "__annotations__", {}) or attr in getattr(
                klass, "__slots__", ()):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(attr)}\b\s*(:[^=\n]*)?=", source):
            return True
    return False


def _candidates(target: str, module: Optional[str], klass: Optional[str]) -> list[str]:
    names = []
    if module and klass:
        names.append(f"{module}.{klass}.{target}")
    if module:
        names.append(f"{module}.{target}")
    names.append(target)
    return names


def _members_named(module: str, attr: str) -> list[str]:
    """``module.Class.attr`` for every class of ``module`` that has ``attr``."""
    mod = _import(module)
    if mod is _MISSING:
        return []
    found = []
    for name, value in vars(mod).items():
        if inspect.isclass(value) and value.__module__ == module:
            if hasattr(value, attr) or _declared_attribute(value, attr):
                found.append(f"{module}.{name}.{attr}")
    return found


@functools.cache
def _imported_names(module: str) -> dict[str, str]:
    """name -> ``module.name`` for every ``from X import name`` in ``module``'s
    source, those under ``if TYPE_CHECKING:`` included (string annotations
    name them, and they are not attributes of the module at run time)."""
    mod = _import(module)
    try:
        tree = ast.parse(inspect.getsource(mod))
    except (OSError, TypeError, SyntaxError):
        return {}
    package = module if hasattr(mod, "__path__") else module.rpartition(".")[0]
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _canonical(name: str, obj: Any) -> str:
    """Where ``obj`` is defined: ``module.qualname`` (classes, functions)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj):
            return f"{module}.{qualname}"
    return name


def missing_reference(app: Sphinx, env: BuildEnvironment, node: nodes.Element,
                      contnode: nodes.Element) -> Optional[nodes.Element]:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    if not target or hasattr(builtins, target):
        return None
    module, klass = node.get("py:module"), node.get("py:class")
    names = _candidates(target, module, klass)
    if module and "." not in target:
        names += _members_named(module, target)
    if module:
        head, _, rest = target.partition(".")
        imported = _imported_names(module).get(head)
        if imported:
            names.append(f"{imported}.{rest}" if rest else imported)
    domain = env.get_domain("py")
    for name in names:
        obj = _import(name)
        if obj is _MISSING:
            continue
        canonical = _canonical(name, obj)
        for typ in (node["reftype"], "obj"):
            if canonical == target and typ == node["reftype"]:
                continue  # what Sphinx already failed to find
            ref = domain.resolve_xref(env, node.get("refdoc", ""), app.builder, typ,
                                      canonical, node, contnode)
            if ref is not None:
                return ref
        return contnode
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", missing_reference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
