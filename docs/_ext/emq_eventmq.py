"""Sets the "EventMQ:" paragraph of a docstring apart, and gives the pages
an ``.. eventmq::`` directive for the same box.

emq-green keeps EventMQ's API, so the docstring of a member EventMQ also
has ends with a paragraph that starts ``EventMQ:`` and says how the member
differs there (or that it does not). In the source that stays plain text,
readable in ``help()``; on the built pages it is set apart (a container of
class ``emq-eventmq``, labelled "EventMQ"), the same for methods,
properties and attributes.

The paragraph runs to the end of the docstring, or to the next field
(``:param ...:``) or directive line. Runs after napoleon, on its output.

A member whose comparison is too long for its docstring (``JobManager``'s,
whose class must stay small) has it on its page instead, as the content of
its ``.. automethod::`` (or ``autoattribute``, ``autoproperty``) directive,
which Sphinx appends to the docstring::

    .. automethod:: on_request

       .. eventmq::

          The same message, put on the worker processes' queue...

The directive makes the box a docstring's paragraph makes.

Either way, a member's field lists (parameters, return type, raises) are
moved to just before its box, so the box ends the entry, and the page's
text follows the docstring's summary as the docstring's own would.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

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


class EventMQDirective(SphinxDirective):
    """``.. eventmq::``: its content, labelled "EventMQ:", in the box."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        if not "".join(self.content).strip():
            raise self.error("eventmq: the comparison with EventMQ is missing")
        content = self.content[:]
        content.data[0] = f"**{PREFIX}** {content.data[0].strip()}"
        box = nodes.container(classes=["emq-eventmq"])
        self.set_source_info(box)
        self.state.nested_parse(content, self.content_offset, box)
        return [box]


def fields_before_box(app: Sphinx, domain: str, objtype: str,
                      contentnode: addnodes.desc_content) -> None:
    """Runs after autodoc has added the type hints to the field lists."""
    box = next((n for n in contentnode.children if isinstance(n, nodes.container)
                and "emq-eventmq" in n["classes"]), None)
    if box is None:
        return
    fields = [n for n in contentnode.children if isinstance(n, nodes.field_list)]
    for field in fields:
        contentnode.remove(field)
    at = contentnode.index(box)
    contentnode[at:at] = fields


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.napoleon")
    app.add_directive("eventmq", EventMQDirective)
    app.connect("autodoc-process-docstring", process, priority=600)
    app.connect("object-description-transform", fields_before_box, priority=600)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
