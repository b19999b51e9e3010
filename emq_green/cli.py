"""The ``emq-green`` console script: ``emq-jobmanager``'s command line.

gevent must patch the standard library before anything else imports
``socket``, ``ssl``, ``threading`` or the job modules, so this module imports
nothing at the top but :mod:`os` and :mod:`sys`; ``--no-monkey-patch`` (or
``EVENTMQ_NO_MONKEY_PATCH=true``) opts out.
"""

import functools
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # nothing imported at run time
    from typing import Any, Callable


def _wants_patch(argv: list, environ: dict) -> bool:
    if "--no-monkey-patch" in argv:
        return False
    return "t" not in environ.get("EVENTMQ_NO_MONKEY_PATCH", "").lower()


def setup_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s - %(name)s %(levelname)s - %(message)s",
        stream=sys.stderr,
    )


#: allocations between two collections of the youngest generation (CPython's
#: default is 700)
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Set the garbage collector up for a long-running worker, once its
    start-up is done (the console script calls this; an application that
    embeds a JobManager may too).

    With a thousand jobs in flight, each holding a few containers, CPython's
    youngest generation filled every few dozen jobs and the survivors were
    traversed again and again. Everything imported so far is moved out of
    the collector's way for good (``gc.freeze()``) and the youngest
    generation is collected every 10,000 allocations. A job does not create
    reference cycles of its own (``tests/test_jobmanager.py`` checks), so
    memory is still freed as soon as a job ends.
    """
    import gc

    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def _add_standalone(parser) -> None:
    parser.add_argument(
        "--standalone", action="store_true",
        help="run a router in this process too (frontend_addr, backend_addr, "
             "administrative_addr from [router]); this job manager connects to it "
             "in-process and other workers may connect to its backend")


def main(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _wants_patch(argv, dict(os.environ)):
        from gevent import monkey

        monkey.patch_all()

    from .jobmanager import JobManager, settings_logging_warnings
    from .settings import SettingsError, eventmq_abbreviations, load_settings

    argv = eventmq_abbreviations(argv)  # for --standalone's router settings too

    def load():
        return load_settings(argv, os.environ, section="jobmanager", prog="emq-green",
                             extra_arguments=_add_standalone)

    try:
        settings, ns = load()
        router_settings = None
        if ns.standalone:
            router_settings = load_settings(argv, os.environ, section="router",
                                            prog="emq-green",
                                            extra_arguments=_add_standalone)[0]
    except SettingsError as exc:
        sys.stderr.write(f"emq-green: {exc}\n")
        return 2
    setup_logging(settings.super_debug)
    warn_misplaced("emq-green", "jobmanager", ns, standalone=ns.standalone)
    # Jobs are imported by module path; like other job runners, the current
    # directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    # (what was wrong with the file at the start is no reason to refuse a reload)
    reload = functools.partial(settings_logging_warnings, load, reloading=True,
                               known=ns.config_warnings)
    if router_settings is not None:
        return _standalone(settings, router_settings, reload)
    if not _curve_ok(settings):
        return 2
    warn_unused(settings, {
        "dashboard_addr": "is ignored: the dashboard is the router's (emq-green-router or "
                          "emq-green --standalone); a worker's page is served at "
                          "--metrics-addr"})
    try:  # job_entry_func/job_exit_func are imported here
        manager = JobManager(settings=settings,
                             settings_loader=reload)
    except SettingsError as exc:
        sys.stderr.write(f"emq-green: {exc}\n")
        return 2
    tune_gc()
    return _serve(manager, settings.kill_grace_period)


def _serve(manager: "Any", grace: float) -> int:
    """Serve until stopped; the exit status (1 after a crash: a supervisor
    restarts it). A job can reach past its own greenlet: ``sys.exit()`` in a
    greenlet it spawned, or in a loop callback, is not the worker's to obey
    (gevent raises it in the main greenlet: the process ended at once,
    status 0, its jobs lost), it is logged as that greenlet's failure; one
    thrown into the main greenlet stops the worker as a crash."""
    import logging

    import gevent

    hub = gevent.get_hub()
    hub.SYSTEM_ERROR = tuple(e for e in hub.SYSTEM_ERROR
                             if e not in (SystemExit, KeyboardInterrupt))
    # gevent counts a greenlet's SystemExit as no error at all (nothing
    # printed): here it is one, reported with its traceback like any other
    hub.NOT_ERROR = tuple(e for e in hub.NOT_ERROR if e is not SystemExit)
    try:
        manager.serve_forever()
    except (SystemExit, KeyboardInterrupt) as exc:
        logging.getLogger("emq_green").error(
            "%s(%s) reached the worker's main greenlet (from a job?); stopping",
            type(exc).__name__, exc)
        manager.stop(timeout=grace + 5)
        return 1
    _warn_of_lingering_threads(logging.getLogger("emq_green.cli"))
    return 1 if manager.crashed is not None else 0


def _warn_of_lingering_threads(logger: "Any") -> None:
    """Python waits for non-daemon threads at exit: one a job started and
    left running keeps a stopped worker's process alive (EventMQ's job
    manager waits for them too). Said, not silent."""
    import threading

    main = threading.main_thread()
    left = [t.name for t in threading.enumerate()
            if t is not main and not t.daemon and t.is_alive()]
    if left:
        logger.warning("stopped, but %d non-daemon thread(s) a job started still run (%s): "
                       "the process exits when they end; SIGTERM or SIGKILL ends it now",
                       len(left), ", ".join(left[:5]) + (", ..." if len(left) > 5 else ""))


def warn_unused(settings, unused: "dict[str, str]") -> None:
    """A WARNING for each setting of ``unused`` (name: why it does nothing
    in this program) that is not at its default: a setting another program
    reads is accepted everywhere (one INI file or environment for all), so
    a misplaced one would otherwise pass unnoticed."""
    import json
    import logging

    from .settings import Settings

    for name, why in unused.items():
        value = getattr(settings, name)
        if value != getattr(Settings, name):
            shown = json.dumps(list(value)) if isinstance(value, tuple) else value
            logging.getLogger("emq_green.cli").warning("%s (%s) %s", name, shown, why)


#: why a program ignores a flag meant for another
_MISPLACED_WHY = {
    "jobmanager": "router settings: give them to emq-green-router, or to emq-green "
                  "--standalone",
    "standalone": "--standalone's job manager connects to its own router in this process",
    "router": "settings of a worker or a scheduler, not of the router",
    "scheduler": "settings of a worker or a router, not of the scheduler",
}


def warn_misplaced(prog: str, section: str, ns, standalone: bool = False,
                   with_scheduler: bool = False) -> None:
    """A WARNING naming the flags of the command line this program does not
    use (every program accepts every setting), one for each EventMQ
    setting that did something in EventMQ's program and is not read here,
    and those :func:`~emq_green.settings.load_settings` found (its
    ``start_warnings``: settings EventMQ ran with that may not do what was
    meant)."""
    import logging

    from .settings import misplaced_flags

    log = logging.getLogger("emq_green.cli")
    names = misplaced_flags(section, ns.from_command_line, standalone, with_scheduler)
    if names:
        log.warning("%s does not use %s, given on its command line: %s", prog,
                    ", ".join(names), _MISPLACED_WHY["standalone" if standalone else section])
    # EventMQ settings set to something that mattered there
    for name, (value, why) in getattr(ns, "eventmq_unread", {}).items():
        log.warning("%s = %s: an EventMQ setting %s does not read; %s", name, value, prog, why)
    for text in getattr(ns, "start_warnings", ()):
        if (section == "router" or standalone) and text.startswith("heartbeat_interval ("):
            continue  # the router says it itself, at start (a probe saw both)
        log.warning("%s", text)


def _curve_ok(settings) -> bool:
    """Load the worker's CURVE keys once at start, so that a bad key file
    stops it with a message instead of failing at each connection."""
    from .curve import CurveError, client_curve

    try:
        for addr in settings.worker_addresses():
            client_curve(settings.curve_secret_key_file, settings.curve_server_key_file,
                         addr, who=settings.name)
    except CurveError as exc:
        sys.stderr.write(f"emq-green: {exc}\n")
        return False
    return True


def _standalone(settings, router_settings, load) -> int:
    """Router and job manager in one process; the manager reaches the router
    over ``inproc://``. Stopping either stops both."""
    import uuid

    import gevent
    import zmq.green as zmq

    from .jobmanager import JobManager, State
    from .settings import SettingsError

    inproc = f"inproc://emq-green-{uuid.uuid4().hex}"
    to_router = {"worker_addr": inproc, "worker_addr_default": inproc,
                 "worker_addr_failover": inproc}
    context = zmq.Context.instance()
    try:  # before the router starts: job_entry_func/job_exit_func are imported here
        manager = JobManager(settings=settings.replace(**to_router),
                             settings_loader=lambda: load().replace(**to_router),
                             context=context)
    except SettingsError as exc:
        sys.stderr.write(f"emq-green: {exc}\n")
        return 2
    try:
        router, scheduler = _start_router(router_settings, context, "emq-green",
                                          extra_backend_addrs=(inproc,), with_scheduler=True)
    except _CannotStart as exc:
        return exc.status
    # the job manager drains first, as on SIGTERM; the router stops after it.
    # Asked again (a retry, two operators), the drain goes on: a second
    # graceful stop() would kill the running jobs
    def drain() -> None:
        if manager.state not in (State.DRAINING, State.STOPPED):
            manager.stop(timeout=None)

    router.on_admin_disconnect = drain

    def stop_manager_with_router() -> None:
        router.serve_forever()
        manager.stop(timeout=None)

    def stop_scheduler_with_manager() -> None:
        # jobs the scheduler fires while the manager drains would be dropped
        # with the router, and counted as run in the scheduler's file
        manager.wait_for_state(State.DRAINING)
        scheduler.stop()

    watchers = [gevent.spawn(stop_manager_with_router)]
    if scheduler is not None:
        watchers.append(gevent.spawn(stop_scheduler_with_manager))
    status = _serve(manager, settings.kill_grace_period)
    gevent.killall(watchers)
    if scheduler is not None:
        scheduler.stop()
    router.stop()
    return status


class _CannotStart(Exception):
    """The router could not start; ``status``: the program's exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _start_router(settings, context, prog: str, extra_backend_addrs=(),
                  with_scheduler: bool = False):
    """Start a router, its dashboard and (``with_scheduler``) a scheduler
    in this process, connected to it over ``inproc://``. Raises
    ``_CannotStart`` when the router cannot start (the reason written
    to stderr; exit status 2 for its CURVE settings, as the other programs
    give, else 1)."""
    import uuid

    from .curve import CurveError
    from .router.broker import Router
    from .router.dashboard import start_dashboard

    front = f"inproc://emq-green-front-{uuid.uuid4().hex}"
    router = Router(settings=settings, extra_backend_addrs=extra_backend_addrs,
                    extra_frontend_addrs=(front,) if with_scheduler else (), context=context)
    try:
        router.start()
    except OSError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        raise _CannotStart(2 if isinstance(exc, CurveError) else 1) from None
    start_dashboard(router, settings.dashboard_addr)
    scheduler = None
    if with_scheduler:
        from .scheduler import Scheduler

        scheduler = Scheduler(settings=settings, context=context, addr=front)
        try:
            scheduler.start()
        except Exception as exc:  # its file cannot be opened, or another scheduler has it
            sys.stderr.write(f"{prog}: scheduler_file {settings.scheduler_file}: {exc}\n")
            router.stop()
            raise _CannotStart(1) from None
    return router, scheduler


def _stop_on_signals(what: str, stop) -> None:
    """SIGTERM, SIGINT and SIGQUIT call ``stop`` in a greenlet, after a log
    line naming the signal."""
    import logging
    import signal

    import gevent

    def on_signal(signum: int) -> None:
        logging.getLogger(f"emq_green.{what}").info(
            "%s: %s received; stopping", what, signal.Signals(signum).name)
        stop()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        gevent.signal_handler(signum, lambda n=signum: gevent.spawn(on_signal, n))


def _log_status_on_sigusr1(what: str, status: "Callable[[], dict[str, Any]]") -> None:
    """SIGUSR1 logs ``status()`` as one JSON line, ``<what> status: {...}``
    (its default action would end the process)."""
    import json
    import logging
    import signal

    import gevent

    def log() -> None:
        logging.getLogger(f"emq_green.{what}").info(
            "%s status: %s", what, json.dumps(status(), sort_keys=True, default=str))

    gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(log))


def router_main(argv: "list[str] | None" = None) -> int:
    """``emq-green-router``: the router alone, settings from [global] and [router]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import signal

    import gevent
    import zmq.green as zmq

    from .settings import SettingsError, load_settings

    try:
        settings, ns = load_settings(argv, os.environ, section="router",
                                     prog="emq-green-router")
    except SettingsError as exc:
        sys.stderr.write(f"emq-green-router: {exc}\n")
        return 2
    setup_logging(settings.super_debug)
    warn_misplaced("emq-green-router", "router", ns, with_scheduler=settings.run_scheduler)
    warn_unused(settings, {"allowed_callables": (
        "is a worker setting: the router passes every REQUEST on, and only the scheduler it "
        "runs (--scheduler) checks the schedules it takes against it; set it for emq-green"
        if settings.run_scheduler else
        "has no effect on emq-green-router: it is a worker setting (emq-green refuses "
        "other callables); set it for emq-green")})
    context = zmq.Context() if settings.curve_secret_key_file else zmq.Context.instance()
    # before the router starts: a SIGUSR1 as soon as it listens is handled
    started: dict = {}

    def status() -> dict:
        router = started.get("router")
        if router is None:
            return {"state": "starting"}
        return {"state": router.state.value, "workers": len(router.workers),
                **router.status()}

    _log_status_on_sigusr1("router", status)
    try:
        router, scheduler = _start_router(settings, context, "emq-green-router",
                                          with_scheduler=settings.run_scheduler)
    except _CannotStart as exc:
        return exc.status
    started["router"] = router

    def stop() -> None:
        if scheduler is not None:
            scheduler.stop()
        router.stop()

    _stop_on_signals("router", stop)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(router.reload_authorized_keys))
    router.serve_forever()
    return 0


#: emq-green-scheduler's file when scheduler_file is not set at all (in the
#: working directory)
DEFAULT_SCHEDULER_FILE = "emq-green-schedules.db"


def scheduler_name(scheduler_file: str) -> str:
    """The default name of a scheduler that keeps its schedules in
    ``scheduler_file``: the host and the file, not the pid, so that one
    restarted on the same file is the same scheduler to the router, which
    gives it its schedules back (a new name would be a stranger, and the
    schedules it restored a stale copy)."""
    import hashlib

    digest = hashlib.sha1(os.path.abspath(scheduler_file).encode()).hexdigest()[:10]
    return f"{os.uname().nodename}-{digest}"


def default_scheduler_file_problem(path: str) -> "str | None":
    """Why the default ``scheduler_file`` (``path``, in the working
    directory) cannot be used, or None. Falling back to memory would lose
    the schedules at the next restart without a word; the user chooses."""
    if os.path.exists(path):
        return None
    try:  # tried, not os.access: root passes that where no file can be made (/proc)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(path)
        return None
    except OSError:
        pass
    return (f"scheduler_file: not set, and its default {path} cannot be created (the "
            "working directory is not writable); set scheduler_file to a writable path "
            "(--scheduler-file), or to empty for schedules in memory only")


def scheduler_main(argv: "list[str] | None" = None) -> int:
    """``emq-green-scheduler``: settings from [global] and [scheduler]."""
    argv = list(sys.argv[1:] if argv is None else argv)


    from .curve import CurveError
    from .scheduler import Scheduler
    from .settings import SettingsError, load_settings

    try:
        settings, ns = load_settings(argv, os.environ, section="scheduler",
                                     prog="emq-green-scheduler")
    except SettingsError as exc:
        sys.stderr.write(f"emq-green-scheduler: {exc}\n")
        return 2
    setup_logging(settings.super_debug)
    warn_misplaced("emq-green-scheduler", "scheduler", ns)
    if ns.scheduler_file is None:
        # not set anywhere: schedules are kept, as EventMQ's scheduler keeps
        # them in Redis by default; an empty value keeps them in memory only
        settings = settings.replace(scheduler_file=os.path.abspath(DEFAULT_SCHEDULER_FILE))
        problem = default_scheduler_file_problem(settings.scheduler_file)
        if problem:
            sys.stderr.write(f"emq-green-scheduler: {problem}\n")
            return 2
    if ns.name is None and settings.scheduler_file:
        settings = settings.replace(name=scheduler_name(settings.scheduler_file))
    try:
        scheduler = Scheduler(settings=settings)
    except CurveError as exc:
        sys.stderr.write(f"emq-green-scheduler: {exc}\n")
        return 2
    # the handlers first: a signal as soon as it says it runs is handled
    _stop_on_signals("scheduler", scheduler.stop)
    _log_status_on_sigusr1("scheduler", scheduler.status)
    try:
        scheduler.start()
    except Exception as exc:  # the file cannot be opened or read: a setting to mend
        sys.stderr.write(f"emq-green-scheduler: {settings.scheduler_file}: {exc}\n")
        return 2
    scheduler.serve_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
