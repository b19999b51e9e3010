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
API exposes on purpose. Everything here is decided from the text alone,
before anything is imported.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .protocol import RunRequest


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
        return f"{request.name!r} is not a dotted Python name"
    if request.callable.startswith("_") or cls.startswith("_"):
        return f"{request.name!r} names a private or dunder attribute"
    if any(p.startswith("__") for p in modules):
        return f"{request.name!r} names a dunder module"
    if allowed is not None and not matches(request, allowed):
        return f"{request.name} is not in allowed_callables"
    return None


class CallablePolicy:
    """:func:`refusal` for one ``allowed_callables`` setting, remembered per
    name: a worker sees a few names many times, and this runs per job."""

    CACHE_MAX = 1024

    def __init__(self, allowed: Optional[Sequence[str]]) -> None:
        self.allowed = None if allowed is None else tuple(allowed)
        self._seen: dict[tuple[str, str], Optional[str]] = {}

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

__all__ = ["NOT_ALLOWED", "CallablePolicy", "check_pattern", "matches", "refusal"]
