"""Sets the "EventMQ:" paragraph of a docstring apart.

emq-green keeps EventMQ's API, so the docstring of a member EventMQ also
has ends with a paragraph that starts ``EventMQ:`` and says how the member
differs there (or that it does not). In the source that stays plain text,
readable in ``help()``; on the built pages it is set apart (a container of
class ``emq-eventmq``, labelled "EventMQ"), the same for methods,
properties and attributes.

The paragraph runs to the end of the docstring, or to the next field
(``:param ...:``) or directive line. Runs after napoleon, on its output.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx

PREFIX = "EventMQ:"


def _boxed(lines: list[str]) -> list[str]:
    start = next((i for i, line in enumerate(lines) if line.startswith(PREFIX)), None)
    if start is None:
        return lines
    end = start + 1
    while end < len(lines) and not lines[end].startswith((":", ".. ")):
        end += 1
    first = lines[start][len(PREFIX):].strip()
    body = [f"**EventMQ:** {first[:1].upper()}{first[1:]}", *lines[start + 1:end]]
    while body and not body[-1].strip():
        body.pop()
    box = [".. container:: emq-eventmq", ""]
    box += [f"   {text}" if text.strip() else "" for text in body]
    return [*lines[:start], *box, "", *_boxed(lines[end:])]


def process(app: Sphinx, what: str, name: str, obj: Any, options: Any,
            lines: list[str]) -> None:
    lines[:] = _boxed(list(lines))


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.napoleon")
    app.connect("autodoc-process-docstring", process, priority=600)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
