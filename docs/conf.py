"""Sphinx configuration of emq-green's reference documentation.

Build with ``bash scripts/docs.sh`` (HTML into ``docs/_build/html``, warnings
as errors, nitpicky cross-references, then the doctests of the pages that
have them). The build reaches no network (no intersphinx): a reference to another
library's class, or to an internal part these pages do not show, is shown
as code once docs/_ext/emq_refs.py has found it in the code.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import emq_green  # noqa: E402  (the installed package: scripts/docs.sh installs it)

project = "emq-green"
author = "emq-green contributors"
copyright = "emq-green contributors"
release = version = emq_green.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",
    "emq_settings",
    "emq_eventmq",
    "emq_refs",
]

smartquotes_action = "qe"  # no dashes: "--flag" stays two hyphens
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "requirements.txt"]

# ---------------------------------------------------------------------------
# HTML: the Read the Docs theme, as EventMQ's own pages

html_theme = "sphinx_rtd_theme"
html_title = f"emq-green {release}"
html_show_sourcelink = True
templates_path: list[str] = []
html_static_path = ["_static"]
html_css_files = ["emq.css"]

# ---------------------------------------------------------------------------
# Markdown pages (the design notes that predate this site)

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# ---------------------------------------------------------------------------
# API reference

autodoc_default_options = {
    "members": True,
    "member-order": "alphabetical",  # as EventMQ's page
    "show-inheritance": True,
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "all"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "class"
autodoc_class_signature = "mixed"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = True
napoleon_use_ivar = False
napoleon_attr_annotations = True
strip_signature_backslash = True  # napoleon: "async_" stays "async_" (matches its type hint)
# Attribute and property docstrings: napoleon reads "text: more" on their
# first line as "type: description", so such a first line has no colon.
# A last paragraph "EventMQ: ..." becomes a box (docs/_ext/emq_eventmq.py).

nitpicky = True
# No nitpick_ignore: docs/_ext/emq_refs.py looks every reference Sphinx
# cannot resolve up in the code. One that names nothing still fails.

# ---------------------------------------------------------------------------
# Doctests (the getting-started and client pages): a real router and worker,
# started by the pages' testsetup blocks through docs/_ext/doctest_box.py.

doctest_test_doctest_blocks = ""
doctest_global_setup = ""
