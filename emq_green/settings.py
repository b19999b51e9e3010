"""Settings: parsed once, at the edge, into one immutable :class:`Settings`.

Sources and precedence are EventMQ 0.3.13's, with the command line on top:

    command line  >  EVENTMQ_<NAME> environment variables  >  INI file  >  default

The INI file is ``-C/--config``, else ``$EVENTMQ_CONFIG_FILE``, else
``/etc/eventmq.conf`` (a missing default file is fine). A job manager reads
``[global]`` and then ``[jobmanager]``, the latter winning whatever the order
in the file; the router reads ``[global]`` then ``[router]``. Keys that belong
to other programs are ignored. Lists are JSON; a boolean is true when its
text contains a ``t`` (``true``, ``True``, ``t``), as in EventMQ.

A bad value raises :class:`SettingsError` naming the setting and its source.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence

import configargparse

from .protocol import Queues, parse_queues, queue_names

DEFAULT_CONFIG_FILE = "/etc/eventmq.conf"
ENV_PREFIX = "EVENTMQ_"
DEFAULT_ADDR = "tcp://127.0.0.1:47290"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Every setting emq-green reads, one attribute each (the table of the
    settings page lists them); immutable. Build it with :func:`load_settings`;
    ``Settings()`` holds the defaults."""

    name: str = ""
    config_file: str = DEFAULT_CONFIG_FILE
    worker_addr: str = DEFAULT_ADDR
    worker_addr_default: str = DEFAULT_ADDR
    worker_addr_failover: str = DEFAULT_ADDR
    concurrent_jobs: int = 4
    queues: Queues = ((10, "default"),)
    default_queue_name: str = "default"
    default_queue_weight: int = 10
    heartbeat_interval: float = 3.0
    heartbeat_timeout: float = 5.0
    heartbeat_liveness: int = 3
    disable_heartbeats: bool = False
    reconnect_timeout: float = 5.0
    global_timeout: float = 300.0
    kill_grace_period: float = 300.0
    max_job_count: int = 1024
    subprocess_setup_func: str = ""
    job_entry_func: str = ""
    job_exit_func: str = ""
    super_debug: bool = False
    hide_heartbeat_logs: bool = True
    max_sockets: int = 1024
    hwm: int = 10000
    # emq-green's own
    monkey_patch: bool = True
    subprocess_callables: tuple[str, ...] = ()
    subprocess_pool_size: int = 0
    #: None (unset): every callable may run, as in EventMQ; else only these
    allowed_callables: Optional[tuple[str, ...]] = None
    #: bytes; -1 = unlimited (ZeroMQ MAXMSGSIZE, and the whole message)
    max_message_size: int = 16 * 1024 * 1024
    # loop-block monitor, heartbeats while blocked, offload, metrics (monitoring.md)
    block_threshold: float = 1.0
    thread_heartbeats: bool = True
    offload_after_blocks: int = 0
    offload_after_seconds: float = 0.0
    metrics_addr: str = ""
    # the embedded router
    frontend_addr: str = "tcp://127.0.0.1:47291"
    backend_addr: str = DEFAULT_ADDR
    administrative_addr: str = "tcp://127.0.0.1:47293"
    #: router: bytes of requests it buffers in all, before it stops reading clients
    max_buffer_bytes: int = 128 * 1024 * 1024
    #: router: results it holds a client's address for at most (docs/router.md)
    max_pending_results: int = 100_000
    #: router: bytes those pending results may take in all (msgids, identities)
    max_pending_result_bytes: int = 32 * 1024 * 1024
    #: router: pending results one client identity may hold at most
    max_pending_results_per_client: int = 25_000
    #: router: seconds a pending result is kept before it is dropped as expired
    result_ttl: float = 3600.0
    # CURVE (emq_green/curve.py); all empty: plain links, as EventMQ
    curve_secret_key_file: str = ""
    curve_server_key_file: str = ""
    curve_authorized_keys: str = ""
    #: router: HOST:PORT of the dashboard page (empty: off; see dashboard.py)
    dashboard_addr: str = ""
    #: host names the HTTP pages (metrics, dashboard) answer to, besides their
    #: bound address and localhost (emq_green/web/serve.py)
    http_allowed_hosts: tuple[str, ...] = ()
    #: router: SQLite file of accepted guaranteed requests (empty: memory only)
    journal_file: str = ""
    #: router: "normal" (survives kill -9 of the router) or "full" (power loss)
    journal_sync: str = "normal"
    #: router: times a guaranteed request is sent again after the worker
    #: running it died, before the router gives up on it (0: no limit)
    max_redeliveries: int = 5
    #: scheduler: the router's client socket it connects to (EventMQ's SCHEDULER_ADDR)
    scheduler_addr: str = "tcp://127.0.0.1:47291"
    #: scheduler: SQLite file of its schedules (empty: memory only)
    scheduler_file: str = ""
    #: router: run a scheduler in the router's process (emq-green-router --scheduler)
    run_scheduler: bool = False

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (setting name = value) applied, unchecked."""
        return dataclasses.replace(self, **changes)

    def worker_addresses(self) -> tuple[str, ...]:
        """The addresses a job manager tries in turn, each once: ``worker_addr``,
        ``worker_addr_default``, ``worker_addr_failover`` (repeats left out)."""
        return tuple(dict.fromkeys((self.worker_addr, self.worker_addr_default,
                                    self.worker_addr_failover)))


# ---------------------------------------------------------------------------
# conversions: text -> value; each raises ValueError with a short reason

def _to_bool(text: str) -> bool:
    return "t" in text.lower()


#: texts that mean true elsewhere and false here (no 't'): a WARNING names them
_FALSE_AS_IN_EVENTMQ = frozenset({"1", "y", "yes", "on"})


def _to_int(text: str) -> int:
    return int(text.strip())


def _to_count(text: str) -> int:
    value = _to_int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _to_positive_int(text: str) -> int:
    value = _to_int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _to_seconds(text: str) -> float:
    value = float(text.strip())
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _to_positive_seconds(text: str) -> float:
    value = _to_seconds(text)
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _to_str_list(text: str) -> tuple[str, ...]:
    raw = json.loads(text)
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError('must be a JSON list of strings like ["reports.build"]')
    return tuple(raw)


def _to_callable_patterns(text: str) -> tuple[str, ...]:
    from .callables import check_pattern

    patterns = _to_str_list(text)
    for pattern in patterns:
        check_pattern(pattern)
    return patterns


def _to_size(text: str) -> int:
    value = _to_int(text)
    if value == -1:
        return value
    if value < 1:
        raise ValueError("must be a number of bytes (at least 1), or -1 for unlimited")
    return value


def _to_queues(text: str) -> Queues:
    """The ``queues`` setting's JSON; ``[]`` is no queues of its own: as
    EventMQ, the worker then announces none and the router gives it its
    default queues (the router's ``queues`` setting)."""
    if text.replace(" ", "") == "[]":
        return ()
    return parse_queues(text)


def fractional_weights(texts: Sequence[str]) -> list[str]:
    """``weight for name`` of each queue in ``texts`` (the ``queues`` JSON,
    or ``-Q``'s items) whose weight is not a whole number: emq-green's
    weights are integers, and such a weight is cut to its integer part,
    where EventMQ's router compared it as written."""
    try:
        raw = json.loads(" ".join(texts))
    except ValueError:
        return []
    found = []
    for item in raw if isinstance(raw, list) else ():
        if isinstance(item, list) and len(item) == 2:
            weight, name = item if not isinstance(item[0], str) else item[::-1]
            if isinstance(weight, float) and not weight.is_integer():
                found.append(f"{weight:g} for {name}")
    return found


def _to_addr(text: str) -> str:
    text = text.strip()
    if "://" not in text:
        raise ValueError("must be a ZeroMQ address like tcp://127.0.0.1:47290")
    return text


def _to_http_addr(text: str) -> str:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (both loopback: see
    :func:`emq_green.web.serve.parse_http_addr`); empty turns it off."""
    from .web.serve import parse_http_addr

    text = text.strip()
    if text.isdigit():
        text = ":" + text
    if text:
        parse_http_addr(text)
    return text


def _to_file(text: str) -> str:
    """A path to a readable file; empty turns the setting off."""
    text = text.strip()
    if text and os.path.isdir(text):
        raise ValueError("is a directory: a file is needed")
    if text and not os.path.isfile(text):
        raise ValueError("no such file")
    if text and not os.access(text, os.R_OK):
        raise ValueError("file not readable")
    return text


def _to_directory(text: str) -> str:
    text = text.strip()
    if text and os.path.exists(text) and not os.path.isdir(text):
        raise ValueError("is a file: a directory is needed")
    if text and not os.path.isdir(text):
        raise ValueError("no such directory")
    return text


def _to_journal_file(text: str) -> str:
    """A file path whose directory exists; empty turns the journal off."""
    text = text.strip()
    if text and not os.path.isdir(os.path.dirname(os.path.abspath(text))):
        raise ValueError("its directory does not exist")
    if text and os.path.isdir(text):
        raise ValueError("is a directory, not a file")
    return text


def _to_journal_sync(text: str) -> str:
    text = text.strip().lower()
    if text not in ("normal", "full"):
        raise ValueError('must be "normal" (survives kill -9) or "full" (an fsync per '
                         "commit: survives power loss)")
    return text


@dataclass(frozen=True)
class _Spec:
    field: str
    flags: tuple[str, ...]
    convert: Callable[[str], Any]
    help: str
    cli_only: bool = False


_SPECS: tuple[_Spec, ...] = (
    _Spec("worker_addr", ("-B", "--broker-addr", "--worker-addr"), _to_addr,
          "router backend address to connect to"),
    _Spec("worker_addr_default", ("--worker-addr-default",), _to_addr,
          "first of the two addresses alternated on reconnect (default: worker_addr)"),
    _Spec("worker_addr_failover", ("--worker-addr-failover",), _to_addr,
          "second of the two addresses alternated on reconnect (default: worker_addr)"),
    _Spec("concurrent_jobs", ("-J", "--jobs", "--concurrent-jobs"), _to_positive_int,
          "jobs run at once (greenlets)"),
    _Spec("default_queue_name", ("--default-queue-name",), str, "queue used when none is given"),
    _Spec("default_queue_weight", ("--default-queue-weight",), _to_int,
          "weight of a queue named without one"),
    _Spec("heartbeat_interval", ("--heartbeat-interval",), _to_positive_seconds,
          "seconds between heartbeats sent"),
    _Spec("heartbeat_timeout", ("--heartbeat-timeout",), _to_positive_seconds,
          "seconds of silence that count as one missed heartbeat"),
    _Spec("heartbeat_liveness", ("--heartbeat-liveness",), _to_positive_int,
          "missed heartbeats before the router is taken for dead"),
    _Spec("disable_heartbeats", ("--disable-heartbeats",), _to_bool,
          "neither send nor watch heartbeats (the router must not watch them either: "
          "one that does drops this worker after its heartbeat_timeout, silently, and "
          "the jobs of its queues wait)"),
    _Spec("reconnect_timeout", ("--reconnect-timeout",), _to_positive_seconds,
          "seconds to wait for ACK before trying again"),
    _Spec("global_timeout", ("--global-timeout",), _to_seconds,
          "job timeout when the request gives none (0: none)"),
    _Spec("kill_grace_period", ("--kill-grace-period",), _to_seconds,
          "seconds a graceful stop waits for running jobs"),
    _Spec("max_job_count", ("--max-job-count",), _to_positive_int,
          "jobs a subprocess child runs before it is replaced"),
    _Spec("subprocess_setup_func", ("--subprocess-setup-func",), str,
          "dotted path of a function run once before jobs run: in the worker at start "
          "and in each subprocess child"),
    _Spec("job_entry_func", ("--job-entry-func",), str,
          "dotted path of a function run before every job"),
    _Spec("job_exit_func", ("--job-exit-func",), str,
          "dotted path of a function run after every job, even a failed one"),
    _Spec("super_debug", ("--super-debug",), _to_bool, "log every message"),
    _Spec("hide_heartbeat_logs", ("--hide-heartbeat-logs",), _to_bool,
          "leave heartbeats out of debug logs"),
    _Spec("max_sockets", ("--max-sockets",), _to_positive_int, "ZeroMQ socket limit"),
    _Spec("hwm", ("--hwm",), _to_positive_int,
          "ZeroMQ high-water mark; router: also requests buffered per queue before it "
          "stops reading clients"),
    _Spec("subprocess_callables", ("--subprocess-callables",), _to_callable_patterns,
          'callables or "module.*" prefixes always run in a subprocess (JSON list)'),
    _Spec("allowed_callables", ("--allowed-callables",), _to_callable_patterns,
          'only these callables may run: JSON list of full names or "module.*" prefixes '
          "(default: unset, every callable may run)"),
    _Spec("max_message_size", ("--max-message-size",), _to_size,
          "largest message accepted, in bytes (-1: unlimited)"),
    _Spec("subprocess_pool_size", ("--subprocess-pool-size",), _to_int,
          "subprocess children for CPU-bound jobs (0: number of CPUs)"),
    _Spec("block_threshold", ("--block-threshold",), _to_seconds,
          "seconds the event loop may be blocked before the monitor reports it (0: off)"),
    _Spec("thread_heartbeats", ("--thread-heartbeats",), _to_bool,
          "send HEARTBEAT from a native thread while the event loop is blocked"),
    _Spec("offload_after_blocks", ("--offload-after-blocks",), _to_int,
          "send a callable to the subprocess pool after it blocked the loop this "
          "many times (0: never)"),
    _Spec("offload_after_seconds", ("--offload-after-seconds",), _to_seconds,
          "send a callable to the subprocess pool after it blocked the loop this "
          "long in total (0: never)"),
    _Spec("metrics_addr", ("--metrics-addr",), _to_http_addr,
          "HOST:PORT (or PORT, on loopback) for the HTTP metrics and status endpoint "
          "(default: off)"),
    _Spec("http_allowed_hosts", ("--http-allowed-hosts",), _to_str_list,
          "host names the HTTP pages answer to besides their address and localhost "
          "(JSON list; others get 421)"),
    _Spec("frontend_addr", ("--frontend-addr",), _to_addr, "router: address for clients"),
    _Spec("backend_addr", ("--backend-addr",), _to_addr, "router: address for workers"),
    _Spec("administrative_addr", ("--administrative-addr",), _to_addr,
          "router: administrative address"),
    _Spec("max_buffer_bytes", ("--max-buffer-bytes",), _to_size,
          "router: bytes of requests buffered in all before it stops reading clients"),
    _Spec("max_pending_results", ("--max-pending-results",), _to_positive_int,
          "router: results waiting to go back to their clients, at most; a result "
          "request beyond is refused"),
    _Spec("max_pending_result_bytes", ("--max-pending-result-bytes",), _to_positive_int,
          "router: bytes the pending results may take in all; a result request beyond "
          "is refused"),
    _Spec("max_pending_results_per_client", ("--max-pending-results-per-client",),
          _to_positive_int,
          "router: pending results one client may hold; its result requests beyond are "
          "refused (others are not affected)"),
    _Spec("result_ttl", ("--result-ttl",), _to_positive_seconds,
          "router: seconds a result request waits for its result before it is dropped"),
    _Spec("curve_secret_key_file", ("--curve-secret-key-file",), _to_file,
          "CURVE: this process's secret certificate (NAME.key_secret); router: turns "
          "CURVE on for all its sockets (default: none, plain)"),
    _Spec("curve_server_key_file", ("--curve-server-key-file",), _to_file,
          "CURVE: the router's public certificate (worker, client) (default: none)"),
    _Spec("curve_authorized_keys", ("--curve-authorized-keys",), _to_directory,
          "CURVE: directory of public certificates allowed in (router; re-read on "
          "SIGHUP) (default: none)"),
    _Spec("dashboard_addr", ("--dashboard-addr",), _to_http_addr,
          "router: HOST:PORT (or PORT, on loopback) for the dashboard page (default: off)"),
    _Spec("journal_file", ("--journal-file",), _to_journal_file,
          "router: SQLite file where guaranteed requests are kept until they finish, "
          "so that they survive a router restart (default: none, kept in memory only)"),
    _Spec("journal_sync", ("--journal-sync",), _to_journal_sync,
          'router: "normal" (a commit survives kill -9 of the router) or "full" (an '
          "fsync per commit: survives power loss)"),
    _Spec("max_redeliveries", ("--max-redeliveries",), _to_count,
          "router: times a guaranteed request is sent again after the worker running it "
          "died; lost once more, it is given up (logged, dropped from the journal, its "
          "client told): a job that kills its worker does not kill them all (0: no limit)"),
    _Spec("scheduler_addr", ("--scheduler-addr",), _to_addr,
          "scheduler: the router's client address it connects to (EventMQ's SCHEDULER_ADDR)"),
    _Spec("scheduler_file", ("--scheduler-file",), _to_journal_file,
          "scheduler: SQLite file where schedules are kept, so that they survive a restart; "
          "empty: memory only (default: emq-green-schedules.db in the working directory for "
          "emq-green-scheduler, memory only for the scheduler inside emq-green --standalone "
          "or emq-green-router --scheduler)"),
    _Spec("run_scheduler", ("--scheduler", "--run-scheduler"), _to_bool,
          "emq-green-router: run a scheduler in the router's process too, connected to it "
          "in-process (emq-green --standalone always runs one)"),
)

# What --help lists for the router's and the scheduler's programs (every
# flag is still accepted by each, so one INI file or set of EVENTMQ_*
# variables can serve all three); the job manager's lists everything, as
# emq-green --standalone runs a router and a scheduler too.
_HELP_FIELDS: dict[str, frozenset[str]] = {
    "router": frozenset({
        "heartbeat_interval", "heartbeat_timeout", "disable_heartbeats", "kill_grace_period",
        "super_debug", "hide_heartbeat_logs", "hwm", "max_message_size", "http_allowed_hosts",
        "frontend_addr", "backend_addr", "administrative_addr", "default_queue_name",
        "max_buffer_bytes", "max_pending_results", "max_pending_result_bytes",
        "max_pending_results_per_client", "result_ttl", "curve_secret_key_file",
        "curve_authorized_keys", "dashboard_addr", "journal_file", "journal_sync",
        "max_redeliveries", "run_scheduler", "scheduler_file", "allowed_callables"}),
    "scheduler": frozenset({
        "heartbeat_interval", "heartbeat_timeout", "heartbeat_liveness", "disable_heartbeats",
        "reconnect_timeout", "super_debug", "allowed_callables", "scheduler_addr",
        "scheduler_file", "curve_secret_key_file", "curve_server_key_file"}),
}
_DESCRIPTIONS = {
    "jobmanager": "emq-green: a cooperative (gevent) job manager for EventMQ",
    "router": "emq-green-router: an EventMQ (eMQP/1.0) router: clients' jobs to workers "
              "by named, weighted queues",
    "scheduler": "emq-green-scheduler: periodic and delayed jobs for an EventMQ router "
                 "(EventMQ's emq-scheduler)",
}

# Keys whose meaning in the file differs from the command-line flag of the
# same name: the file's ``queues`` is JSON, ``-Q`` takes names.
_FILE_KEY_ALIASES = {"queues": "queues-json"}
#: variables named after a flag rather than the setting (``--scheduler``
#: is run_scheduler): both names are read, the setting's winning
_ENV_ALIASES = {ENV_PREFIX + "SCHEDULER": ENV_PREFIX + "RUN_SCHEDULER"}
#: the INI keys of settings (what a file may say that is read)
_FIELD_NAMES = frozenset([*(spec.field for spec in _SPECS), "queues"])
_QUEUES_JSON_FLAG = "--queues-json"


class _SectionsParser(configargparse.ConfigFileParser):
    """INI reader: ``[global]`` then ``[<section>]``, the latter winning.

    configargparse knows a key by its flag (``concurrent-jobs``,
    ``queues-json``); ``written`` maps each key it was given back to the
    key and section as they are in the file, for error messages."""

    def __init__(self, section: str, written: Optional[dict[str, str]] = None,
                 unread: Optional[dict[str, str]] = None) -> None:
        super().__init__()
        self.section = section
        #: configargparse's key -> "KEY in [SECTION]", as written in the file
        self.written = {} if written is None else written
        #: settings of EVENTMQ_UNREAD found in the file: name -> value
        self.unread = {} if unread is None else unread

    def __call__(self) -> _SectionsParser:
        return self

    def get_syntax_description(self) -> str:
        return f"INI file; [global] then [{self.section}] are read, unknown keys ignored"

    def parse(self, stream: Any) -> OrderedDict:
        # %(name)s substitutions are expanded, as EventMQ's ConfigParser does;
        # a value that cannot be expanded (a lone %) is taken as written
        ini = configparser.ConfigParser()
        try:
            ini.read_string(stream.read(), source=getattr(stream, "name", "<config>"))
        except configparser.Error as exc:
            raise configargparse.ConfigFileParserException(str(exc)) from exc
        items: OrderedDict = OrderedDict()
        for section in ("global", self.section):
            if ini.has_section(section):
                for written in ini.options(section):
                    try:
                        value = ini.get(section, written)
                    except configparser.InterpolationMissingOptionError as exc:
                        # EventMQ stops on it too (with a traceback); taken as
                        # written, it failed later as a bad address. A key no
                        # setting reads is not expanded by EventMQ either.
                        if not _reads(written):
                            continue
                        raise configargparse.ConfigFileParserException(
                            f"[{section}] {written}: %({exc.reference})s names no key of "
                            f"[{section}] or [DEFAULT]") from None
                    except configparser.InterpolationError:
                        value = ini.get(section, written, raw=True)
                    name = written.strip().lower()
                    if name in EVENTMQ_UNREAD:
                        self.unread[name] = value
                    key = name.replace("_", "-")
                    key = _FILE_KEY_ALIASES.get(key, key)
                    items[key] = value
                    self.written[key] = f"{written.strip()} in [{section}]"
        return items


#: emq-jobmanager's long options: a prefix of one (``--job``, ``--queue``)
#: that names it alone among them means it there, though emq-green's longer
#: list of options makes it ambiguous here
_EVENTMQ_LONG_OPTIONS = ("--broker-addr", "--config", "--queues", "--jobs", "--name")


def eventmq_abbreviations(argv: Sequence[str]) -> list[str]:
    """``argv`` with emq-jobmanager's abbreviated long options written out,
    so a command line it accepted means the same here."""
    out = []
    for n, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[n:])
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and len(flag) > 2 and flag not in _EVENTMQ_LONG_OPTIONS:
            named = [o for o in _EVENTMQ_LONG_OPTIONS if o.startswith(flag)]
            if len(named) == 1:
                arg = named[0] + eq + value
        out.append(arg)
    return out


def _config_path(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, bool]:
    """(path, must exist): -C wins over $EVENTMQ_CONFIG_FILE over the default.

    A missing file named by -C is an error. EventMQ ignores a missing file
    named by the environment, so a drop-in does too, with a warning.
    """
    pre = configargparse.ArgumentParser(add_help=False)
    pre.add_argument("-C", "--config")
    known, _ = pre.parse_known_args(list(argv))
    if known.config:
        return known.config, True
    path = environ.get(ENV_PREFIX + "CONFIG_FILE")
    if path:
        return path, False  # (missing: a start-up warning, see _open_config)
    return DEFAULT_CONFIG_FILE, False


def _sources_help(section: str, config_file: str) -> str:
    """The end of ``--help``: the other two sources, and the precedence."""
    here = "" if config_file == DEFAULT_CONFIG_FILE else f" (here: {config_file})"
    return (f"Each setting can also be given as an {ENV_PREFIX}<NAME> environment variable "
            f"or as a key of the INI file, named after it: --heartbeat-interval is "
            f"{ENV_PREFIX}HEARTBEAT_INTERVAL and heartbeat_interval. The INI file is -C, "
            f"else ${ENV_PREFIX}CONFIG_FILE, else {DEFAULT_CONFIG_FILE}{here}; [global] "
            f"then [{section}] are read, the latter winning, and unknown keys are ignored. "
            f"Precedence: command line, then environment variables, then the INI file, "
            f"then defaults.")


class _Parser(configargparse.ArgumentParser):
    """argparse's errors with a one-line usage: the full one (45 lines) hid
    the reason, printed after it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage: {self.prog} [options]  (--help lists them)\n"
                     f"{self.prog}: error: {message}\n")


def build_parser(
    section: str, config_file: str, prog: Optional[str] = None,
    file_keys: Optional[dict[str, str]] = None, unread: Optional[dict[str, str]] = None,
    read_config: bool = True,
) -> configargparse.ArgumentParser:
    """The parser of ``section``'s program; ``file_keys`` is filled, as the
    INI file is read, with what :attr:`_SectionsParser.written` says, and
    ``unread`` with :attr:`_SectionsParser.unread`; ``read_config`` false
    leaves ``config_file`` unread (one that cannot be opened)."""
    parser = _Parser(
        prog=prog,
        description=_DESCRIPTIONS.get(section, _DESCRIPTIONS["jobmanager"]),
        epilog=_sources_help(section, config_file),
        default_config_files=[config_file] if read_config else [],
        config_file_parser_class=_SectionsParser(section, file_keys, unread),
        ignore_unknown_config_file_keys=True,
        add_config_file_help=False,
        add_env_var_help=False,
    )
    parser.add_argument("-C", "--config", help="INI file (env EVENTMQ_CONFIG_FILE)")
    name_default = ("the host and a hash of scheduler_file, the same across restarts"
                    if section == "scheduler" else "host-pid-random")
    parser.add_argument("-n", "--name", env_var=ENV_PREFIX + "NAME",
                        help=f"name of this instance (default: {name_default})")
    listed = _HELP_FIELDS.get(section)
    worker = listed is None
    parser.add_argument("-Q", "--queues", nargs="+", metavar="NAME[:WEIGHT]",
                        help="queues to listen on" if worker else argparse.SUPPRESS)
    parser.add_argument(_QUEUES_JSON_FLAG, dest="queues_json", env_var=ENV_PREFIX + "QUEUES",
                        help='queues as JSON [[weight, name], ...] (file key "queues")'
                        if worker else argparse.SUPPRESS)
    for spec in _SPECS:
        default = getattr(Settings, spec.field, None)
        shown = json.dumps(list(default)) if isinstance(default, tuple) else default
        help_text = spec.help if "default" in spec.help else f"{spec.help} (default: {shown})"
        if listed is not None and spec.field not in listed:
            help_text = argparse.SUPPRESS
        kwargs: dict[str, Any] = {"dest": spec.field, "help": help_text,
                                  "env_var": ENV_PREFIX + spec.field.upper()}
        if spec.convert is _to_bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(*spec.flags, **kwargs)
    parser.add_argument("--no-monkey-patch", dest="no_monkey_patch", action="store_true",
                        env_var=ENV_PREFIX + "NO_MONKEY_PATCH",
                        help="do not gevent-monkeypatch the process (console script only)"
                        if worker else argparse.SUPPRESS)
    return parser


def _sources(parser: configargparse.ArgumentParser,
             file_keys: Mapping[str, str]) -> dict[str, str]:
    """dest -> where its value came from, for every value not from the
    command line: the variable or the INI key as the user wrote it."""
    found: dict[str, str] = {}
    for source, entries in parser.get_source_to_settings_dict().items():
        for key, (action, _value) in entries.items():
            if action is None:
                continue
            if source == "environment_variables":
                found[action.dest] = f"environment variable {key}"
            elif source.startswith("config_file"):
                found[action.dest] = (f"config file {source.partition('|')[2]} "
                                      f"(key {file_keys.get(key, key)})")
    return found


def default_name() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _open_config(path: str, explicit: bool, section: str) -> tuple[bool, list[str]]:
    """Whether the INI file at ``path`` is read, and the start-up warnings
    about it.

    As in EventMQ, a file that is not there is skipped, and one it cannot
    open (a directory, no permission) too, with a warning here; the one
    named by ``-C`` must be there and readable (an explicit request cannot
    be honoured). Text that is not UTF-8 or not INI is an error for every
    source (EventMQ stops on it with a traceback)."""
    if not os.path.exists(path):
        if explicit:
            raise SettingsError(f"config: file {path} does not exist")
        if path != DEFAULT_CONFIG_FILE:  # named by EVENTMQ_CONFIG_FILE
            return False, [f"{ENV_PREFIX}CONFIG_FILE names {path}, which does not exist; "
                           "using defaults"]
        return False, []
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if explicit:
            raise SettingsError(f"config: cannot read {path}: {reason}") from None
        return False, [f"config: cannot read {path} ({reason}); skipped, as EventMQ skips "
                       "it: the environment and the defaults are used"]
    ini = configparser.ConfigParser(interpolation=None)
    try:
        ini.read_string(data.decode("utf-8"), source=path)
    except UnicodeDecodeError as exc:
        raise SettingsError(f"config: cannot read {path}: not UTF-8 text ({exc})") from None
    except configparser.Error as exc:
        raise SettingsError(f"config: cannot read {path}: {exc}") from None
    _check_references(data.decode("utf-8"), path, section)
    return True, _section_warnings(ini, path, section)


def _reads(key: str) -> bool:
    """Whether the INI key ``key`` is a setting emq-green reads."""
    return key.strip().lower() in _FIELD_NAMES


def _check_references(text: str, path: str, section: str) -> None:
    """A ``%(name)s`` in a value this program reads that names no key: one
    SettingsError (EventMQ stops on it too, with a traceback; taken as
    written, it failed later as a bad address). Keys no setting reads
    (``log_fmt = %(asctime)s``, another tool's) are not looked at: EventMQ
    starts with them."""
    ini = configparser.ConfigParser()
    ini.read_string(text, source=path)
    for name in ("global", section):
        for option in ini.options(name) if ini.has_section(name) else ():
            if not _reads(option):
                continue
            try:
                ini.get(name, option)
            except configparser.InterpolationMissingOptionError as exc:
                raise SettingsError(f"config: {path}: [{name}] {option}: %({exc.reference})s "
                                    f"names no key of [{name}] or [DEFAULT]") from None
            except configparser.InterpolationError:
                pass  # a lone %: taken as written


def _section_warnings(ini: configparser.ConfigParser, path: str, section: str) -> list[str]:
    """A warning when the file lacks the section of this program, as EventMQ
    logs one. EventMQ's router reads ``[global]`` only, so a router's file
    without ``[router]`` is as EventMQ expects it; a file with no section
    at all holds no setting that could be missed."""
    if not ini.sections() or ini.has_section(section) or (
            section == "router" and ini.has_section("global")):
        return []
    read = ("only [global] is read from it" if ini.has_section("global")
            else "no setting is read from it")
    return [f"config: {path} has no [{section}] section; {read}"]


def load_settings(
    argv: Optional[Sequence[str]] = None,
    environ: Optional[Mapping[str, str]] = None,
    section: str = "jobmanager",
    prog: Optional[str] = None,
    extra_arguments: Optional[Callable[[configargparse.ArgumentParser], None]] = None,
) -> tuple[Settings, Any]:
    """Read every source once and return the settings.

    Sources, highest first: ``argv``, ``EVENTMQ_<NAME>`` variables of
    ``environ``, the INI file (``[global]``, then ``[section]``), defaults.

    Args:
        argv: command-line arguments (default none: not ``sys.argv``).
        environ: the environment (default ``os.environ``, only read).
        section: the INI section read after ``[global]``: ``jobmanager``,
            ``router`` or ``scheduler``.
        prog: the program name shown by ``--help`` and in errors.
        extra_arguments: called with the parser, so that a console script
            can add flags of its own; their values are in the namespace.

    Returns:
        ``(settings, namespace)``: the :class:`Settings`, and the parsed
        command line.

    Raises:
        SettingsError: a value cannot be used; the message names the
            setting and where the value came from.
    """
    argv = list(argv if argv is not None else [])
    if section == "jobmanager":
        argv = eventmq_abbreviations(argv)
    environ = dict(os.environ if environ is None else environ)
    aliased = {}
    for alias, variable in _ENV_ALIASES.items():
        if alias in environ and variable not in environ:
            environ[variable], aliased[variable] = environ[alias], alias
    config_file, explicit = _config_path(argv, environ)
    read_config, warnings = _open_config(config_file, explicit, section)
    file_warnings = list(warnings)  # (what is wrong with the INI file itself)
    file_keys: dict[str, str] = {}
    unread: dict[str, str] = {}
    parser = build_parser(section, config_file, prog, file_keys, unread,
                          read_config=read_config)
    if extra_arguments:
        extra_arguments(parser)
    # the mapping we were given, not os.environ (which is never changed: a
    # swap would be seen by other threads, and by setproctitle)
    try:
        ns = parser.parse_args(argv, env_vars=environ)
    except configargparse.ConfigFileParserException as exc:
        raise SettingsError(f"config: cannot read {config_file}: {exc}") from exc
    sources = _sources(parser, file_keys)
    for field, where in sources.items():  # named as the user wrote it
        variable = where.rpartition(" ")[2]
        if variable in aliased:
            sources[field] = where.replace(variable, aliased[variable])

    values: dict[str, Any] = {"config_file": config_file}

    def convert(field: str, text: Any, fn: Callable[[Any], Any], dest: str = "") -> Any:
        where = sources.get(dest or field, "the command line")
        try:
            return fn(text)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{field}: bad value {text!r} from {where}: {exc}") from None

    for spec in _SPECS:
        text = getattr(ns, spec.field, None)
        if text is not None:
            values[spec.field] = convert(spec.field, text, spec.convert)
            if spec.convert is _to_bool and text.strip().lower() in _FALSE_AS_IN_EVENTMQ:
                warnings.append(
                    f"{spec.field}: {text!r} from {sources.get(spec.field, 'the command line')} "
                    "means false: as in EventMQ, a boolean setting is true only when its "
                    "text contains a 't' (true)")
    if ns.name:
        values["name"] = ns.name
    weight = values.get("default_queue_weight", Settings.default_queue_weight)
    cut = fractional_weights(ns.queues or [ns.queues_json or ""])
    if cut:
        where = sources.get("queues_json", "the command line") if not ns.queues \
            else "the command line"
        warnings.append(f"queues: weight {', '.join(cut)} from {where} is cut to a whole "
                        "number (emq-green's weights are integers; EventMQ's router ranked "
                        "workers by the fraction too): give whole numbers, scaled if need be")
    if ns.queues:
        # (the INI's JSON whole, ``[]`` included, else names)
        values["queues"] = convert("queues", ns.queues, lambda names: (
            _to_queues(" ".join(names)) if names[0].lstrip().startswith("[")
            else queue_names(names, weight)))
    elif ns.queues_json:
        values["queues"] = convert("queues", ns.queues_json, _to_queues, "queues_json")
    if ns.no_monkey_patch:
        values["monkey_patch"] = False

    #: the settings this command line set itself (not the environment, not
    #: the file): flags meant for this program, see :func:`misplaced_flags`
    ns.from_command_line = frozenset(
        field for field in [*(spec.field for spec in _SPECS), "queues"]
        if field in values and field not in sources
        and not (field == "queues" and not ns.queues and "queues_json" in sources))

    # -B sets where to connect; the alternates follow it unless set themselves
    addr = values.get("worker_addr", Settings.worker_addr)
    values.setdefault("worker_addr_default", addr)
    values.setdefault("worker_addr_failover", addr)
    values.setdefault("name", default_name())
    settings = Settings(**values)
    _check(settings)
    #: WARNINGs for the program to log once its logging is set up (see
    #: emq_green.cli.warn_misplaced): settings that run as in EventMQ but
    #: may not do what was meant
    ns.start_warnings = [*warnings, *heartbeat_warnings(settings)]
    #: what was wrong with the INI file itself (unreadable and skipped, or
    #: no section of this program): a reload takes it for a mistake
    ns.config_warnings = file_warnings
    for name in EVENTMQ_UNREAD:  # the environment first, as in EventMQ
        if ENV_PREFIX + name.upper() in environ:
            unread[name] = environ[ENV_PREFIX + name.upper()]
    #: EventMQ settings of this program that would do something there and
    #: are not read here: name -> (value, what to use instead)
    ns.eventmq_unread = {name: (value, EVENTMQ_UNREAD[name][2]) for name, value in unread.items()
                         if _unread_in_effect(section, name, value)}
    return settings, ns


#: EventMQ 0.3.13 settings emq-green does not read: the section of the
#: EventMQ program that reads them, EventMQ's default, what to use here
EVENTMQ_UNREAD: dict[str, tuple[str, str, str]] = {
    "setup_path": ("jobmanager", "", "use job_entry_func or subprocess_setup_func"),
    "setup_callable": ("jobmanager", "",
                       "use job_entry_func or subprocess_setup_func"),
    "wal": ("router", "/var/log/eventmq/wal.log",
            "guaranteed requests are kept in journal_file"),
    "wal_enabled": ("router", "false", "guaranteed requests are kept in journal_file"),
    **{name: ("scheduler", default, "emq-green-scheduler keeps its schedules in "
              "scheduler_file (SQLite), not Redis")
       for name, default in (("rq_host", "localhost"), ("rq_port", "6379"), ("rq_db", "0"),
                             ("rq_password", ""), ("redis_client_class", "redis.StrictRedis"),
                             ("redis_client_class_kwargs", "{}"),
                             ("redis_startup_error_hard_kill", "true"))},
}


def _unread_in_effect(section: str, name: str, value: str) -> bool:
    """Whether ``value`` of an EVENTMQ_UNREAD setting would do something in
    EventMQ's program of ``section`` (not its default, not empty, true)."""
    program, default, _why = EVENTMQ_UNREAD[name]
    value = value.strip()
    if program != section or not value or value.lower() == default.lower():
        return False
    return "t" in value.lower() if name == "wal_enabled" else True


#: what only a router (or its scheduler) reads: a plain emq-green ignores them
_ROUTER_ONLY = frozenset({
    "frontend_addr", "backend_addr", "administrative_addr", "max_buffer_bytes",
    "max_pending_results", "max_pending_result_bytes", "max_pending_results_per_client",
    "result_ttl", "curve_authorized_keys", "journal_file", "journal_sync", "max_redeliveries",
    "run_scheduler",
    "scheduler_file", "scheduler_addr"})


def misplaced_flags(section: str, given: frozenset[str], standalone: bool = False,
                    with_scheduler: bool = False) -> list[str]:
    """The settings of ``given`` (set on the command line) that the program
    reading ``section`` ignores: every program accepts every setting, for
    one INI file or environment shared by all, but a flag is meant for the
    program it is given to."""
    if section in _HELP_FIELDS:
        # the router's queues are those of a worker that announces none
        # (emq-jobmanager always does so), though -Q is not in its --help
        used = _HELP_FIELDS[section] | ({"queues"} if section == "router" else set())
        if with_scheduler:  # the router's own scheduler (--scheduler)
            used |= _HELP_FIELDS["scheduler"] - {"scheduler_addr", "curve_server_key_file"}
        return sorted(given - used)
    if standalone:  # the job manager connects in-process, and so does its scheduler
        return sorted(given & {"worker_addr", "worker_addr_default", "worker_addr_failover",
                               "scheduler_addr"})
    return sorted(given & _ROUTER_ONLY)


def _check(s: Settings) -> None:
    # spaces are fine (EventMQ takes them); line breaks, tabs and other
    # control characters would garble the logs the name goes into
    if not s.name.strip() or any(c.isspace() and c != " " or not c.isprintable()
                                 for c in s.name):
        raise SettingsError(f"name: {s.name!r} must be non-empty, printable, with no "
                            "line break or tab")


def heartbeat_warnings(s: Settings) -> list[str]:
    """Start-up warnings for heartbeat settings that run, as in EventMQ 0.3.13,
    but drop connections: a heartbeat sent no more often than the peer's
    limit of silence. EventMQ runs with them too; refusing would stop a
    worker that ran there, so each program says what will happen."""
    if s.disable_heartbeats or s.heartbeat_interval < s.heartbeat_timeout:
        return []
    text = (f"heartbeat_interval ({s.heartbeat_interval:g} s) is not shorter than "
            f"heartbeat_timeout ({s.heartbeat_timeout:g} s): a router with these settings "
            "drops an idle worker between two of its heartbeats, as EventMQ's does")
    if s.heartbeat_interval >= s.heartbeat_timeout * s.heartbeat_liveness:
        text += (f"; and, not shorter than heartbeat_timeout x heartbeat_liveness "
                 f"({s.heartbeat_timeout:g} x {s.heartbeat_liveness}), an idle worker or "
                 "scheduler takes its router for gone and connects again, over and over")
    return [text]
