"""Which callables a request may name, and callable-name patterns.

A request names its job as ``path`` and ``callable``: ``myapp.jobs`` and
``send`` (the function ``myapp.jobs.send``), or ``myapp.jobs:Mailer`` and
``send`` (build ``Mailer(...)``, call its ``send``). The settings that
select callables (``allowed_callables``, ``subprocess_callables``) use one
pattern syntax for that name, ``path.callable``:

- a full name: ``reports.build``, ``app.jobs:Mailer.send``;
- a module prefix: ``imaging.*`` matches every callable of ``imaging`` and
  of its submodules (``imaging.resize``, ``imaging.fx:Blur.run``).

Whatever the settings say, a name that is not made of Python identifiers,
or whose class or callable is private (``_x``) or dunder (``__x__``), or
whose module path has a dunder part (``__main__``), is refused: those reach
interpreter internals (``os._exit``, ``object.__subclasses__``) that no job
API exposes on purpose. That much is decided from the text alone, before
anything is imported (:func:`refusal`).

A module prefix means the callables *defined* in those modules, not what
they imported: with ``["myapp.*"]`` and ``myapp/jobs.py`` doing ``from
subprocess import run``, the text ``myapp.jobs.run`` matches, but the
function is ``subprocess``'s. So once the name is resolved, and before it is
called or its class instantiated, :meth:`CallablePolicy.check_resolved`
checks the function's (for ``module:Class``, the class's) ``__module__``
against the prefixes; an exact full-name entry skips this check, so a
re-exported callable can still be allowed on purpose, by its full name.
Under a prefix, ``module:Name`` must name a class: a function there would be
called as a factory, and nothing vouches for what it returns.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .protocol import RunRequest


class CallableNotAllowed(Exception):
    """A resolved callable (or class) whose ``__module__`` the allowed list
    does not cover; raised before it is called or instantiated."""


def check_pattern(pattern: str) -> None:
    """Raise ValueError unless ``pattern`` is a full name or ``module.*``."""
    body = pattern[:-2] if pattern.endswith(".*") else pattern
    module, _, rest = body.partition(":")
    parts = module.split(".") + (rest.split(".") if rest else [])
    if not body or not all(p.isidentifier() for p in parts):
        raise ValueError(f"{pattern!r} is not a dotted name or a 'module.*' prefix")


def matches(request: RunRequest, patterns: Sequence[str]) -> bool:
    """Whether any pattern names the request's callable (see the module text)."""
    module = request.path.partition(":")[0]
    name = None
    for pattern in patterns:
        if pattern.endswith(".*"):
            prefix = pattern[:-2]
            if module == prefix or module.startswith(prefix + "."):
                return True
        else:
            if name is None:
                name = request.name
            if pattern == name:
                return True
    return False


def _shown(request: RunRequest) -> str:
    """The request's name for an error text: quoted, at most 100 characters
    (a client chooses it, up to max_message_size)."""
    name = request.name
    return repr(name if len(name) <= 100 else name[:100] + "...")


def refusal(request: RunRequest, allowed: Optional[Sequence[str]]) -> Optional[str]:
    """Why the request may not run, or None when it may.

    ``allowed`` is the ``allowed_callables`` setting: None lets every
    well-formed public name run, as EventMQ does; a list lets only what it
    matches run.
    """
    module, _, cls = request.path.partition(":")
    modules = module.split(".")
    if not all(p.isidentifier() for p in modules) or (cls and not cls.isidentifier()) \
            or not request.callable.isidentifier():
        return f"{_shown(request)} is not a dotted Python name"
    if request.callable.startswith("_") or cls.startswith("_"):
        return f"{_shown(request)} names a private or dunder attribute"
    if any(p.startswith("__") for p in modules):
        return f"{_shown(request)} names a dunder module"
    if allowed is not None and not matches(request, allowed):
        return f"{_shown(request)[1:-1]} is not in allowed_callables"
    return None


def module_allowed(module: Optional[str], patterns: Sequence[str]) -> bool:
    """Whether a ``module.*`` pattern covers the module ``module`` (an
    object's ``__module__``; None or a dunder module is never covered)."""
    if not isinstance(module, str) or not module or any(
            p.startswith("__") for p in module.split(".")):
        return False
    for pattern in patterns:
        if pattern.endswith(".*"):
            prefix = pattern[:-2]
            if module == prefix or module.startswith(prefix + "."):
                return True
    return False


class CallablePolicy:
    """:func:`refusal` for one ``allowed_callables`` setting, remembered per
    name: a worker sees a few names many times, and this runs per job; and
    :meth:`check_resolved`, the same list applied to what a name resolved to."""

    CACHE_MAX = 1024

    def __init__(self, allowed: Optional[Sequence[str]]) -> None:
        self.allowed = None if allowed is None else tuple(allowed)
        self._seen: dict[tuple[str, str], Optional[str]] = {}
        # exact entries as (path, callable): ``a.b:C.m`` -> ("a.b:C", "m")
        self._exact = frozenset(
            tuple(p.rpartition(".")[::2]) for p in self.allowed or () if not p.endswith(".*"))
        self._modules: dict[Optional[str], bool] = {}

    def check_resolved(self, request: RunRequest, target: Any) -> None:
        """Raise :class:`CallableNotAllowed` unless ``target`` (the function a
        request names, or for ``module:Class`` the class) is defined in a
        module the list allows, or the request's name is an exact entry.
        Call it after resolving, before calling or instantiating."""
        if self.allowed is None or (request.path, request.callable) in self._exact:
            return
        if ":" in request.path and not isinstance(target, type):
            # EventMQ calls whatever ``module:Name`` is; a function there is
            # a factory, and what it returns is no module's to vouch for
            raise CallableNotAllowed(
                f"{_shown(request)[1:-1]}: {request.path.partition(':')[2][:80]} is not a "
                "class, and allowed_callables does not allow module:Name for anything else "
                "under a module.* entry (a factory's result is no module's; list the full "
                "name to allow it)")
        module = getattr(target, "__module__", None)
        if not isinstance(module, str):
            module = None
        allowed = self._modules.get(module)
        if allowed is None:
            allowed = module_allowed(module, self.allowed)
            if len(self._modules) >= self.CACHE_MAX:
                self._modules.clear()
            self._modules[module] = allowed
        if not allowed:
            what = "class" if isinstance(target, type) else "callable"
            raise CallableNotAllowed(
                f"{_shown(request)[1:-1]} is a {what} of module {str(module)[:80]}, which "
                "allowed_callables does not allow (a module.* entry allows what a module "
                "defines, not what it imports; list the full name to allow it)")

    def refusal(self, request: RunRequest) -> Optional[str]:
        key = (request.path, request.callable)
        try:
            return self._seen[key]
        except KeyError:
            pass
        reason = refusal(request, self.allowed)
        if len(self._seen) >= self.CACHE_MAX:
            self._seen.clear()
        self._seen[key] = reason
        return reason


#: ``error.type`` of the reply to a request whose callable may not run
NOT_ALLOWED = "CallableNotAllowed"

__all__ = ["NOT_ALLOWED", "CallableNotAllowed", "CallablePolicy", "check_pattern", "matches",
           "module_allowed", "refusal"]
