"""Sphinx directives that document emq-green's settings from the code.

``.. emq-settings:: emq-green`` builds a table of every option the program's
``--help`` shows: the setting's name, INI key, ``EVENTMQ_*`` variable,
flags, default and meaning. The rows come from the one settings table,
``emq_green.settings._SPECS`` (with the defaults of the ``Settings``
dataclass), in the order of the program's own parser; the few options that
are not in that table (``-C``, ``-n``, ``-Q``, ...) are read from the parser
itself. A setting added to the table therefore appears here with nothing
else to do.

``.. emq-help:: emq-green`` shows the program's ``--help`` text as built.

Both take the parser the console script really builds: its ``main`` is run
with ``--help`` (and ``--no-monkey-patch``, so nothing is patched) while
``emq_green.settings.build_parser`` is wrapped to keep the parser it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from typing import Any, Callable, Optional
from unittest import mock

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.application import Sphinx

from emq_green import cli
from emq_green import settings as settings_module

PROGRAMS: dict[str, Callable[[list[str]], Any]] = {
    "emq-green": cli.main,
    "emq-green-router": cli.router_main,
}

#: Options of the command line that are not rows of ``_SPECS``: what the
#: parser alone cannot say about them (their INI key and the setting they
#: fill). An option missing here still gets a row, from the parser.
EXTRAS: dict[str, dict[str, str]] = {
    "config": {"setting": "config_file", "ini": "",
               "env": "EVENTMQ_CONFIG_FILE",
               "default": settings_module.DEFAULT_CONFIG_FILE,
               "meaning": "the INI file to read; a file named here must exist (one named "
                          "by the environment may be missing, with a warning)"},
    "name": {"setting": "name", "ini": "name"},
    "queues": {"setting": "queues", "ini": "",
               "meaning": "queues to listen on: -Q takes names with an optional weight "
                          "(NAME:WEIGHT; default weight: default_queue_weight); the INI "
                          "key, the variable and --queues-json take EventMQ's JSON "
                          "[[weight, name], ...]"},
    "queues_json": {"setting": "queues", "ini": "queues", "meaning": ""},
    "no_monkey_patch": {"setting": "monkey_patch", "ini": "",
                        "default": "false (the console script patches)"},
    "standalone": {"setting": "", "ini": "", "default": "false"},
}


def _capture(program: str) -> tuple[Any, str]:
    """(the parser ``program`` builds, its ``--help`` text)."""
    built: list[Any] = []
    real = settings_module.build_parser

    def keep(*args: Any, **kwargs: Any) -> Any:
        parser = real(*args, **kwargs)
        built.append(parser)
        return parser

    out = io.StringIO()
    with mock.patch.object(settings_module, "build_parser", keep), \
            mock.patch.dict("os.environ", {"COLUMNS": "100"}, clear=False), \
            contextlib.redirect_stdout(out):
        try:
            PROGRAMS[program](["--no-monkey-patch", "--help"])
        except SystemExit:
            pass
    if not built:
        raise RuntimeError(f"{program} --help built no parser through build_parser")
    return built[-1], out.getvalue()


def _default_text(value: Any, convert: Optional[Callable[[str], Any]] = None) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps([list(v) if isinstance(v, tuple) else v for v in value])
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return "empty"
    if isinstance(value, int) and convert is settings_module._to_size and value >= 1024:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value} ({value // size} {unit})"
    return str(value)


_DEFAULT_IN_HELP = re.compile(r"\s*\(default: ([^)]*)\)\s*$")


def _split_default(help_text: str) -> tuple[str, Optional[str]]:
    """``"meaning (default: X)"`` -> ("meaning", "X")."""
    found = _DEFAULT_IN_HELP.search(help_text)
    if not found:
        return help_text, None
    return help_text[:found.start()], found.group(1)


def _rows(parser: Any) -> list[dict[str, Any]]:
    specs = {spec.field: spec for spec in settings_module._SPECS}
    fields = {f.name: f for f in dataclasses.fields(settings_module.Settings)}
    rows = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        spec = specs.get(action.dest)
        if spec is not None:
            meaning, default = _split_default(spec.help)
            if default is None:
                default = _default_text(fields[spec.field].default, spec.convert)
            long_key = "--" + spec.field.replace("_", "-")
            if long_key not in spec.flags:
                raise RuntimeError(
                    f"setting {spec.field}: no flag {long_key}, so the INI key "
                    f"{spec.field} would not be read; add it to the table's flags")
            rows.append({"name": spec.field, "ini": spec.field,
                         "env": settings_module.ENV_PREFIX + spec.field.upper(),
                         "flags": list(spec.flags), "default": default,
                         "meaning": meaning})
            continue
        extra = EXTRAS.get(action.dest, {})
        meaning, default = _split_default(action.help or "")
        setting = extra.get("setting", "")
        if "default" in extra:
            default = extra["default"]
        elif default is None and setting in fields:
            default = _default_text(fields[setting].default)
        row = {"name": setting, "ini": extra.get("ini", ""),
               "env": extra.get("env", getattr(action, "env_var", None) or ""),
               "flags": list(action.option_strings), "default": default or "",
               "meaning": extra.get("meaning", meaning)}
        same = next((r for r in rows if setting and r["name"] == setting), None)
        if same is None:
            rows.append(row)
            continue
        # two options of one setting (-Q and --queues-json): one row
        same["flags"] += row["flags"]
        for key in ("ini", "env", "default", "meaning"):
            same[key] = same[key] or row[key]
    return rows


def _literal_list(values: list[str]) -> list[nodes.Node]:
    out: list[nodes.Node] = []
    for i, value in enumerate(values):
        if i:
            out.append(nodes.Text(", "))
        out.append(nodes.literal(value, value))
    return out


def _cell(*content: nodes.Node) -> nodes.entry:
    entry = nodes.entry()
    entry += nodes.paragraph("", "", *content)
    return entry


COLUMNS = ("setting", "default", "meaning")
WIDTHS = (40, 16, 44)


def _labelled(label: str, value: str) -> nodes.paragraph:
    para = nodes.paragraph()
    para += nodes.Text(f"{label} ")
    if value:
        para += nodes.literal(value, value)
    else:
        para += nodes.Text("\N{EM DASH}")
    return para


class SettingsTable(Directive):
    """``.. emq-settings:: PROGRAM``: one row per setting of ``PROGRAM --help``.

    The first cell holds the setting's name, INI key, ``EVENTMQ_*`` variable
    and flags; then its default and its meaning.
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        program = self.arguments[0]
        if program not in PROGRAMS:
            raise self.error(f"unknown program {program!r}; known: {sorted(PROGRAMS)}")
        parser, _ = _capture(program)
        table = nodes.table(classes=["emq-settings"])
        group = nodes.tgroup(cols=len(COLUMNS))
        table += group
        for width in WIDTHS:
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        row = nodes.row()
        for title in COLUMNS:
            row += _cell(nodes.Text(title))
        head += row
        group += head
        body = nodes.tbody()
        for item in _rows(parser):
            key = item["name"] or item["flags"][-1].lstrip("-")
            row = nodes.row(ids=[f"setting-{program}-{key}".replace("_", "-")])
            first = nodes.entry()
            title = nodes.paragraph()
            title += nodes.strong(key, key)
            first += title
            first += _labelled("INI", item["ini"])
            first += _labelled("env", item["env"])
            flags = nodes.paragraph()
            flags += nodes.Text("flags ")
            flags.extend(_literal_list(item["flags"]))
            first += flags
            row += first
            row += _cell(nodes.Text(item["default"]) if item["default"]
                         else nodes.Text("\N{EM DASH}"))
            row += _cell(nodes.Text(item["meaning"]))
            body += row
        group += body
        return [table]


class ProgramHelp(Directive):
    """``.. emq-help:: PROGRAM``: ``PROGRAM --help`` as the code prints it."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        program = self.arguments[0]
        if program not in PROGRAMS:
            raise self.error(f"unknown program {program!r}; known: {sorted(PROGRAMS)}")
        _, text = _capture(program)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("emq-settings", SettingsTable)
    app.add_directive("emq-help", ProgramHelp)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
