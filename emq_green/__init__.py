"""emq-green: a gevent-based, cooperative job manager for EventMQ.

This module stays import-free on purpose: the console script must be able to
monkeypatch before anything that touches ``socket``, ``ssl`` or ``threading``
is imported.
"""

__version__ = "0.1.0"
