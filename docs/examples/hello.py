"""The jobs of the getting-started and client pages.

A job is any function a worker can import by its module path: start
``emq-green`` in the directory that holds this file (the current directory
is importable) and send ``hello.greet``.
"""

from emq_green.client import job


def greet(name: str) -> str:
    """Say hello: what the job returns is its result."""
    return f"Hello, {name}!"


def divide(a: float, b: float) -> float:
    """Fails for ``b == 0``: the caller gets the error back."""
    return a / b


@job(queue="default")
def shout(text: str) -> str:
    """``shout.delay("hi")`` runs it on a worker, ``shout("hi")`` here."""
    return text.upper() + "!"
