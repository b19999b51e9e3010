"""Jobs of an application that also imports what it does not mean to expose
(issue 20): with ``allowed_callables = ["sec_app.*"]`` the names
``sec_app.jobs.run`` and ``sec_app.jobs:Path`` match as text, but they are
``subprocess``'s and ``pathlib``'s, and must not run."""

from json import dumps  # re-exported on purpose: allowed by its full name only
from pathlib import Path  # noqa: F401 (imported for the module's own use)
from subprocess import run  # noqa: F401

__all__ = ["Greeter", "dumps", "own", "path_of"]


def own(text: str) -> str:
    """A job this module defines."""
    return f"own {text}"


class Greeter:
    """A class this module defines."""

    def __init__(self, name: str = "you") -> None:
        self.name = name

    def hello(self) -> str:
        return f"hello {self.name}"


def path_of(name: str) -> Path:
    """A helper this module defines that returns an object of another
    module's class: ``sec_app.jobs:path_of`` names no class."""
    return Path(name)
