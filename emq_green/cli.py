"""The ``emq-green`` console script: ``emq-jobmanager``'s command line.

gevent must patch the standard library before anything else imports
``socket``, ``ssl``, ``threading`` or the job modules, so this module imports
nothing at the top but :mod:`os` and :mod:`sys`; ``--no-monkey-patch`` (or
``EVENTMQ_NO_MONKEY_PATCH=true``) opts out.
"""

import os
import sys


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


def main(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _wants_patch(argv, dict(os.environ)):
        from gevent import monkey

        monkey.patch_all()

    from .jobmanager import JobManager
    from .settings import SettingsError, load_settings

    def load():
        return load_settings(argv, os.environ, section="jobmanager", prog="emq-green")[0]

    try:
        settings = load()
    except SettingsError as exc:
        sys.stderr.write(f"emq-green: {exc}\n")
        return 2
    setup_logging(settings.super_debug)
    # Jobs are imported by module path; like other job runners, the current
    # directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    manager = JobManager(settings=settings, settings_loader=load)
    manager.serve_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
