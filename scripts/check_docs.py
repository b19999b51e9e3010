"""Checks the built documentation against the code (run by scripts/docs.sh).

* the settings page's table has every option ``emq-green --help`` shows
  (and ``emq-green-router --help``), by its flags;
* the jobmanager page documents every member EventMQ's own JobManager page
  lists, each with its "EventMQ:" comparison (from the docstring or from the
  page's ``.. eventmq::``);
* that page also has every other public member of ``JobManager``: they
  are listed there by hand (docs/api/jobmanager.rst), not by ``:members:``.

    python scripts/check_docs.py docs/_build/html
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent

#: the members of ``eventmq.jobmanager.JobManager`` on EventMQ's page
EVENTMQ_MEMBERS = (
    "name", "queues", "skip_signal", "check_worker_health", "concurrent_jobs",
    "handle_response", "jobmanager_main", "jobs_in_flight", "on_heartbeat", "on_request",
    "outgoing", "pid_distribution", "premature_death", "send_ready", "send_reply",
    "total_ready_sent", "total_requests", "worker_death", "worker_done",
    "worker_done_with_reply",
)

_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def help_options(program: str) -> set[str]:
    """Every flag in ``program --help`` (short and long), ``-h``/``--help`` aside."""
    text = subprocess.run([str(BIN / program), "--no-monkey-patch", "--help"],
                          capture_output=True, text=True, check=True,
                          env={"COLUMNS": "200", "PATH": str(BIN)}).stdout
    options: set[str] = set()
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            options.update(_OPTION.findall(invocation))
    return options - {"-h", "--help"}


def settings_table(html: str) -> str:
    start = html.find('<table class="emq-settings')
    end = html.find("</table>", start)
    if start < 0 or end < 0:
        raise SystemExit("check_docs: the settings page has no settings table")
    return html[start:end]


def table_flags(table: str) -> set[str]:
    return set(re.findall(r'<span class="pre">(--?[A-Za-z][\w-]*)</span>', table))


def public_members() -> list[str]:
    """The members autodoc's ``:members:`` would show on ``JobManager``: its
    public attributes and those with a ``#:`` comment or an annotation."""
    from sphinx.pycode import ModuleAnalyzer

    from emq_green.jobmanager import JobManager

    names = {n for n in vars(JobManager) if not n.startswith("_")}
    names.update(JobManager.__annotations__)
    attr_docs = ModuleAnalyzer.for_module("emq_green.jobmanager").find_attr_docs()
    names.update(attr for cls, attr in attr_docs if cls == "JobManager")
    return sorted(n for n in names if not n.startswith("_"))


def undocumented(html: str) -> list[str]:
    """Public members of ``JobManager`` with no entry on its page."""
    return [f"{member}: not documented" for member in public_members()
            if f'id="emq_green.jobmanager.JobManager.{member}"' not in html]


def missing_members(html: str) -> list[str]:
    """EventMQ's members without an entry, or whose entry lacks the comparison."""
    missing = []
    for member in EVENTMQ_MEMBERS:
        anchor = f'id="emq_green.jobmanager.JobManager.{member}"'
        at = html.find(anchor)
        if at < 0:
            missing.append(f"{member}: not documented")
            continue
        entry = html[at:html.find('<dt class="sig', at + len(anchor))]
        if "emq-eventmq" not in entry:
            missing.append(f"{member}: no 'EventMQ:' paragraph")
    return missing


def main(argv: list[str]) -> int:
    built = Path(argv[1] if len(argv) > 1 else "docs/_build/html")
    problems = []
    table = settings_table((built / "api" / "settings.html").read_text())
    shown = table_flags(table)
    for program in ("emq-green", "emq-green-router"):
        for option in sorted(help_options(program) - shown):
            problems.append(f"settings page: {program} --help shows {option}, the table does not")
    page = (built / "api" / "jobmanager.html").read_text()
    problems += [f"jobmanager page: {m}" for m in missing_members(page)]
    problems += [f"jobmanager page: {m}" for m in undocumented(page)
                 if m.split(":")[0] not in EVENTMQ_MEMBERS]
    for problem in problems:
        print(f"check_docs: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_docs: {len(shown)} flags of emq-green --help in the settings table; "
          f"the {len(EVENTMQ_MEMBERS)} members of EventMQ's JobManager documented, "
          f"and its {len(public_members())} public members")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
