"""Settings: sources, precedence, sections and errors."""

from __future__ import annotations

import logging
import textwrap

import pytest

from emq_green.settings import Settings, SettingsError, load_settings, misplaced_flags


def write(tmp_path, text: str, name: str = "eventmq.conf") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_match_eventmq(tmp_path):
    s, _ = load_settings([], {"EVENTMQ_CONFIG_FILE": write(tmp_path, "")})
    assert s.worker_addr == "tcp://127.0.0.1:47290"
    assert (s.concurrent_jobs, s.queues) == (4, ((10, "default"),))
    assert (s.heartbeat_interval, s.heartbeat_timeout, s.heartbeat_liveness) == (3, 5, 3)
    assert (s.reconnect_timeout, s.global_timeout, s.kill_grace_period) == (5, 300, 300)
    assert s.max_job_count == 1024 and s.hide_heartbeat_logs and not s.disable_heartbeats


def test_jobmanager_section_wins_over_global_whatever_the_order(tmp_path):
    conf = write(tmp_path, """
        [jobmanager]
        concurrent_jobs = 7
        [global]
        concurrent_jobs = 3
        heartbeat_interval = 2
        queues = [[30, "fast"], [10, "default"]]
        # router and scheduler keys share the file and are ignored
        wal = /var/log/eventmq/wal.log
        rq_host = localhost
        frontend_addr = tcp://127.0.0.1:5000
        made_up_key = 1
        [router]
        concurrent_jobs = 99
    """)
    s, _ = load_settings(["-C", conf], {})
    assert s.concurrent_jobs == 7
    assert s.heartbeat_interval == 2
    assert s.queues == ((30, "fast"), (10, "default"))
    router, _ = load_settings(["-C", conf], {}, section="router")
    assert router.concurrent_jobs == 99 and router.frontend_addr == "tcp://127.0.0.1:5000"


def test_precedence_command_line_env_file_default(tmp_path):
    conf = write(tmp_path, """
        [global]
        concurrent_jobs = 3
        global_timeout = 30
        reconnect_timeout = 9
    """)
    env = {"EVENTMQ_CONFIG_FILE": conf, "EVENTMQ_CONCURRENT_JOBS": "8",
           "EVENTMQ_GLOBAL_TIMEOUT": "40"}
    s, _ = load_settings(["-J", "9"], env)
    assert s.concurrent_jobs == 9          # command line over env over file
    assert s.global_timeout == 40          # env over file
    assert s.reconnect_timeout == 9        # file over default
    assert s.kill_grace_period == 300      # default


def test_config_flag_wins_over_config_env(tmp_path):
    a = write(tmp_path, "[global]\nconcurrent_jobs = 11\n", "a.conf")
    b = write(tmp_path, "[global]\nconcurrent_jobs = 22\n", "b.conf")
    s, _ = load_settings(["-C", a], {"EVENTMQ_CONFIG_FILE": b})
    assert s.concurrent_jobs == 11 and s.config_file == a
    s, _ = load_settings([], {"EVENTMQ_CONFIG_FILE": b})
    assert s.concurrent_jobs == 22


def test_eventmq_command_line_is_accepted(tmp_path):
    conf = write(tmp_path, "[global]\n")
    s, _ = load_settings(["-B", "tcp://127.0.0.1:6000", "-C", conf, "-Q", "fast", "slow:5",
                          "-J", "12", "-n", "box-1"], {})
    assert s.worker_addr == "tcp://127.0.0.1:6000"
    # -B also moves the reconnect alternates unless they are set themselves
    assert s.worker_addresses() == ("tcp://127.0.0.1:6000",)
    assert s.queues == ((10, "fast"), (5, "slow"))
    assert (s.concurrent_jobs, s.name) == (12, "box-1")


@pytest.mark.parametrize("argv", [['[[10, "default"], [5, "mail"]]'],
                                  ['[[10,', '"default"],', '[5,', '"mail"]]'],
                                  ["default", "mail:5"], ["default, mail:5"],
                                  # one argument with a space (-Q "$QUEUES" in a unit
                                  # file) was one queue named "default mail:5" (a probe)
                                  ["default mail:5"], ["  default\tmail:5 "],
                                  # spaces around the colon belong to no name (a review)
                                  ["default, mail: 5"], ["default mail : 5"]])
def test_queues_on_the_command_line_as_names_or_json(argv):
    s, _ = load_settings(["-Q", *argv], {})
    assert s.queues == ((10, "default"), (5, "mail"))


@pytest.mark.parametrize("argv, fault", [(["[[10, default]]"], "not JSON"),
                                         (['10, "default"]]'], "looks like a piece of JSON"),
                                         (["mail:x"], "bad weight")])
def test_a_queue_list_half_json_is_refused_not_cut_into_names(argv, fault):
    with pytest.raises(SettingsError, match=fault):
        load_settings(["-Q", *argv], {})


def test_the_manager_takes_queues_as_json_text_too():
    from emq_green.jobmanager import JobManager
    manager = JobManager(queues='[[10, "x"], [20, "y"]]', concurrent_jobs=1)
    assert manager.queues == ((10, "x"), (20, "y"))
    with pytest.raises(ValueError, match="queues"):
        JobManager(queues='[[10, "x"]', concurrent_jobs=1)


@pytest.mark.parametrize("argv", [["--job", "12", "--queue", "fast", "slow:5", "--nam", "b"],
                                  ["--j=12", "--q", "fast", "slow:5", "--n", "b"]])
def test_emq_jobmanagers_abbreviated_options_mean_what_they_meant_there(argv):
    # --job could be --jobs, --job-entry-func or --job-exit-func here; among
    # emq-jobmanager's five options it is --jobs
    s, _ = load_settings(argv, {})
    assert (s.concurrent_jobs, s.queues, s.name) == (12, ((10, "fast"), (5, "slow")), "b")
    s, _ = load_settings(["--conc", "7"], {})  # not one of its prefixes: ours
    assert s.concurrent_jobs == 7


def test_flags_meant_for_another_program_are_named_but_not_shared_settings(tmp_path):
    conf = write(tmp_path, "[global]\nconcurrent_jobs = 9\njournal_file = j.db\n")
    env = {"EVENTMQ_QUEUES": '[[10, "x"]]'}

    def misplaced(section, argv, standalone=False):
        _, ns = load_settings(["-C", conf, *argv], env, section=section)
        return misplaced_flags(section, ns.from_command_line, standalone)

    # the file and the environment serve every program: nothing named
    assert misplaced("router", []) == misplaced("jobmanager", []) == []
    assert misplaced("router", ["--concurrent-jobs", "5", "-Q", "a", "--hwm", "9"]) == [
        "concurrent_jobs"]  # its -Q: the queues of workers that announce none
    assert misplaced("scheduler", ["-Q", "a"]) == ["queues"]
    assert misplaced("jobmanager", ["--journal-file", "k.db", "--scheduler", "-J", "3",
                                    "--frontend-addr", "tcp://127.0.0.1:7"]) == [
        "frontend_addr", "journal_file", "run_scheduler"]
    assert misplaced("jobmanager", ["-B", "tcp://10.9.9.9:5", "--journal-file", "k.db"],
                     standalone=True) == ["worker_addr"]
    assert misplaced("scheduler", ["-J", "2", "--scheduler-addr", "tcp://127.0.0.1:7"]) == [
        "concurrent_jobs"]
    # the router's own scheduler reads the scheduler's settings
    _, ns = load_settings(["--scheduler", "--heartbeat-liveness", "5", "--reconnect-timeout",
                           "3"], {}, section="router")
    assert misplaced_flags("router", ns.from_command_line, with_scheduler=True) == []
    assert misplaced_flags("router", ns.from_command_line) == ["heartbeat_liveness",
                                                               "reconnect_timeout"]
    assert misplaced("jobmanager", ["--worker-addr-failover", "tcp://127.0.0.1:7",
                                    "--scheduler-addr", "tcp://127.0.0.1:8"],
                     standalone=True) == ["scheduler_addr", "worker_addr_failover"]


def test_failover_address_from_file(tmp_path):
    conf = write(tmp_path, """
        [jobmanager]
        worker_addr = tcp://127.0.0.1:6001
        worker_addr_failover = tcp://127.0.0.1:6002
    """)
    s, _ = load_settings(["-C", conf], {})
    # worker_addr, then the default (it follows worker_addr), then the failover
    assert s.worker_addresses() == ("tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002")


@pytest.mark.parametrize("text, expected", [("true", True), ("True", True), ("t", True),
                                            ("false", False), ("0", False), ("no", False)])
def test_booleans_are_true_when_they_contain_a_t(tmp_path, text, expected):
    conf = write(tmp_path, f"[global]\ndisable_heartbeats = {text}\n")
    assert load_settings(["-C", conf], {})[0].disable_heartbeats is expected


def test_a_boolean_that_means_true_elsewhere_is_named_when_it_means_false(tmp_path):
    conf = write(tmp_path, "[global]\ndisable_heartbeats = yes\n")
    settings, ns = load_settings(["-C", conf], {"EVENTMQ_SUPER_DEBUG": "1"})
    assert settings.super_debug is False
    said = ns.start_warnings  # logged once logging is set up (a probe saw bare lines)
    assert any(m.startswith("disable_heartbeats: 'yes' from config file") for m in said), said
    assert any(m.startswith("super_debug: '1' from environment variable EVENTMQ_SUPER_DEBUG")
               for m in said), said
    _, ns = load_settings(["-C", conf, "--disable-heartbeats", "true"], {})
    assert not [m for m in ns.start_warnings if "means false" in m]


@pytest.mark.parametrize(
    "argv, env, file_text, message",
    [
        ([], {"EVENTMQ_CONCURRENT_JOBS": "lots"}, "",
         "concurrent_jobs: bad value 'lots' from environment variable EVENTMQ_CONCURRENT_JOBS"),
        (["-J", "0"], {}, "", "concurrent_jobs: bad value '0' from the command line"),
        ([], {}, "[jobmanager]\nqueues = [[10, default]]\n", "queues: bad value"),
        ([], {}, "[jobmanager]\nheartbeat_timeout = soon\n",
         "(key heartbeat_timeout in [jobmanager])"),
        ([], {}, "[global]\nworker_addr = localhost:47290\n", "worker_addr: bad value"),
    ],
)
def test_bad_values_name_the_setting_and_its_source(tmp_path, argv, env, file_text, message):
    conf = write(tmp_path, file_text)
    with pytest.raises(SettingsError) as info:
        load_settings(["-C", conf, *argv], env)
    assert message in str(info.value)
    if file_text and "key" in message:
        assert conf in str(info.value)


@pytest.mark.parametrize("section, file_text, env, message", [
    # the INI keys as written (configargparse knows them as concurrent-jobs
    # and queues-json, which the messages named)
    ("jobmanager", "[global]\nconcurrent_jobs = 2\n[jobmanager]\nconcurrent_jobs = lots\n", {},
     "concurrent_jobs: bad value 'lots' from config file {conf} "
     "(key concurrent_jobs in [jobmanager]): "),
    ("jobmanager", "[jobmanager]\nqueues = default\n", {},
     "queues: bad value 'default' from config file {conf} (key queues in [jobmanager]): "),
    ("router", "[global]\nmax_buffer_bytes = 0\n", {},
     "max_buffer_bytes: bad value '0' from config file {conf} "
     "(key max_buffer_bytes in [global]): "),
    ("jobmanager", "", {"EVENTMQ_QUEUES": "default"},
     "queues: bad value 'default' from environment variable EVENTMQ_QUEUES: "),
])
def test_a_bad_value_names_the_ini_key_or_variable_as_written(tmp_path, section, file_text,
                                                               env, message):
    conf = write(tmp_path, file_text)
    with pytest.raises(SettingsError) as info:
        load_settings(["-C", conf], env, section=section)
    assert str(info.value).startswith(message.format(conf=conf)), str(info.value)


@pytest.mark.parametrize("section", ["jobmanager", "router", "scheduler"])
def test_help_ends_with_every_source_in_the_order_they_win(section):
    from emq_green.settings import build_parser

    text = " ".join(build_parser(section, "/etc/eventmq.conf", "prog").format_help().split())
    assert text.endswith(
        "Each setting can also be given as an EVENTMQ_<NAME> environment variable or as a "
        "key of the INI file, named after it: --heartbeat-interval is "
        "EVENTMQ_HEARTBEAT_INTERVAL and heartbeat_interval. The INI file is -C, else "
        f"$EVENTMQ_CONFIG_FILE, else /etc/eventmq.conf; [global] then [{section}] are read, "
        "the latter winning, and unknown keys are ignored. Precedence: command line, then "
        "environment variables, then the INI file, then defaults.")


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(["-C", str(tmp_path / "nope.conf")], {})


@pytest.mark.parametrize("kind", ["directory", "not utf-8", "not ini"])
def test_an_unreadable_config_file_is_one_settings_error(tmp_path, kind):
    conf = tmp_path / "eventmq.conf"
    if kind == "directory":
        conf.mkdir()
    else:
        conf.write_bytes(b"[global]\nname=\xff\xfe\n" if kind == "not utf-8"
                         else b"[global\nname=x\n")
    sources = [(["-C", str(conf)], {})]
    if kind != "directory":  # EventMQ skips one it cannot open (next test)
        sources.append(([], {"EVENTMQ_CONFIG_FILE": str(conf)}))
    for argv, env in sources:
        with pytest.raises(SettingsError, match=f"config: cannot read {conf}: "):
            load_settings(argv, env, section="router")


def test_a_config_file_from_env_that_cannot_be_opened_is_skipped_with_a_warning(tmp_path):
    """EventMQ's ConfigParser.read skips a file it cannot open (a directory,
    no permission) and runs on the environment and the defaults; emq-green
    exited 2."""
    conf = tmp_path / "eventmq.conf"
    conf.mkdir()
    s, ns = load_settings([], {"EVENTMQ_CONFIG_FILE": str(conf), "EVENTMQ_CONCURRENT_JOBS": "7"})
    assert s.concurrent_jobs == 7 and s.queues == ((10, "default"),)
    assert [w for w in ns.start_warnings
            if w.startswith(f"config: cannot read {conf} (Is a directory); skipped")]


@pytest.mark.parametrize("section, text, warned", [
    ("jobmanager", "[global]\nconcurrent_jobs = 2\n",
     "has no [jobmanager] section; only [global] is read from it"),
    ("jobmanager", "[router]\nhwm = 5\n", "has no [jobmanager] section; no setting is read"),
    ("scheduler", "[global]\nhwm = 5\n", "has no [scheduler] section; only [global] is read"),
    ("router", "[jobmanager]\nhwm = 5\n", "has no [router] section; no setting is read"),
    ("router", "[global]\nhwm = 5\n", None),  # EventMQ's router reads [global] only
    ("jobmanager", "[jobmanager]\nhwm = 5\n", None),
])
def test_a_config_file_without_the_programs_section_is_warned_of(tmp_path, section, text,
                                                                 warned):
    """EventMQ logs 'Tried to read nonexistent section'; emq-green said nothing."""
    conf = write(tmp_path, text)
    for argv, env in ((["-C", conf], {}), ([], {"EVENTMQ_CONFIG_FILE": conf})):
        _, ns = load_settings(argv, env, section=section)
        found = [w for w in ns.start_warnings if w.startswith(f"config: {conf} ")]
        assert found == ([f"config: {conf} {warned}"] if warned else []) or \
            (warned and len(found) == 1 and warned in found[0]), found


@pytest.mark.parametrize("argv, env", [
    (["--heartbeat-interval", "20"], {}),
    ([], {"EVENTMQ_HEARTBEAT_INTERVAL": "5"}),
])
def test_a_heartbeat_interval_too_long_runs_with_a_warning(tmp_path, argv, env):
    """EventMQ runs with it (and drops workers); emq-green refused to start."""
    s, ns = load_settings(["-C", write(tmp_path, "[jobmanager]\n"), *argv], env)
    assert s.heartbeat_interval in (20, 5)
    (warned,) = [w for w in ns.start_warnings if w.startswith("heartbeat_interval")]
    assert "drops an idle worker" in warned
    assert ("connects again, over and over" in warned) == (s.heartbeat_interval == 20)
    _, quiet = load_settings(["-C", write(tmp_path, "[jobmanager]\n"), *argv,
                              "--disable-heartbeats"], env)
    assert not [w for w in quiet.start_warnings if w.startswith("heartbeat_interval")]


@pytest.mark.parametrize("argv, text", [
    ([], '[jobmanager]\nqueues = [[1.5, "default"], [20, "b"]]\n'),
    (["-Q", '[["default", 1.5]]'], "[jobmanager]\n"),
])
def test_a_fractional_queue_weight_is_warned_of(tmp_path, argv, text):
    """EventMQ's router ranks workers by 1.5 as written; emq-green cut it to
    1 without a word."""
    s, ns = load_settings(["-C", write(tmp_path, text), *argv], {})
    assert s.queues[0] == (1, "default")
    (warned,) = [w for w in ns.start_warnings if w.startswith("queues:")]
    assert warned.startswith("queues: weight 1.5 for default from ")
    _, whole = load_settings(["-C", write(tmp_path, '[jobmanager]\nqueues = [[2.0, "a"]]\n')], {})
    assert not [w for w in whole.start_warnings if w.startswith("queues:")]


def test_empty_queues_leave_them_to_the_router_as_in_eventmq(tmp_path):
    """EventMQ's job manager then announces none and its router gives the
    worker the router's own queues; emq-green exited 2."""
    s, _ = load_settings(["-C", write(tmp_path, "[jobmanager]\nqueues = []\n")], {})
    assert s.queues == ()
    s, _ = load_settings([], {"EVENTMQ_QUEUES": " [ ] "})
    assert s.queues == ()
    for argv in (["-Q", "[]"], ["-Q", "[", "]"], ["--queues", " [ ] "]):
        s, _ = load_settings(argv, {})
        assert s.queues == (), argv
    with pytest.raises(SettingsError, match="not JSON"):
        load_settings(["-Q", "[", "x"], {})


def test_settings_are_immutable():
    s = Settings()
    with pytest.raises(AttributeError):
        s.concurrent_jobs = 5  # type: ignore[misc]
    assert s.replace(concurrent_jobs=5).concurrent_jobs == 5 and s.concurrent_jobs == 4


def test_sample_config_in_conf_is_valid():
    import pathlib

    sample = pathlib.Path(__file__).parent.parent / "conf" / "eventmq.conf"
    s, _ = load_settings(["-C", str(sample)], {})
    assert s.concurrent_jobs >= 1


def test_missing_config_file_from_env_is_ignored_like_eventmq(tmp_path):
    s, ns = load_settings([], {"EVENTMQ_CONFIG_FILE": str(tmp_path / "gone.conf")})
    assert s.concurrent_jobs == 4
    assert ns.start_warnings == [f"EVENTMQ_CONFIG_FILE names {tmp_path / 'gone.conf'}, which "
                                 "does not exist; using defaults"]


@pytest.mark.parametrize("env, expected", [
    ({"EVENTMQ_SCHEDULER": "true"}, True),
    ({"EVENTMQ_RUN_SCHEDULER": "true"}, True),
    ({"EVENTMQ_SCHEDULER": "true", "EVENTMQ_RUN_SCHEDULER": "false"}, False),
    ({}, False)])
def test_the_scheduler_flag_s_variable_is_read_under_either_name(env, expected):
    """A probe's find: ``--scheduler``'s INI key ``scheduler`` worked, its
    variable EVENTMQ_SCHEDULER was ignored without a word."""
    assert load_settings([], env, section="router")[0].run_scheduler is expected


def test_a_warning_names_the_variable_as_it_was_set():
    _, ns = load_settings([], {"EVENTMQ_SCHEDULER": "yes"}, section="router")
    [said] = ns.start_warnings
    assert "from environment variable EVENTMQ_SCHEDULER means false" in said


def test_percent_substitutions_are_expanded_as_eventmq_expands_them(tmp_path):
    """EventMQ reads the file with ConfigParser's interpolation; emq-green
    took ``tcp://%(host)s:6000`` literally and died on a ZMQError."""
    conf = write(tmp_path, """
        [DEFAULT]
        host = 127.0.0.1
        [global]
        worker_addr = tcp://%(host)s:6000
        [jobmanager]
        name = box-%(host)s
        queues = [[10, "100%%"]]
        job_entry_func = 50%odd
    """)
    s, _ = load_settings(["-C", conf], {})
    assert s.worker_addr == "tcp://127.0.0.1:6000"
    assert s.name == "box-127.0.0.1"
    assert s.queues == ((10, "100%"),)
    # a lone % cannot be expanded: taken as written (EventMQ's get() raised)
    assert s.job_entry_func == "50%odd"


def test_a_substitution_naming_no_key_is_one_settings_error(tmp_path):
    """``%(base)s`` naming a key of another section was taken as written and
    the worker died later on a ZMQError traceback (a probe); EventMQ stops
    on it too. Now one line naming the key and the reference."""
    conf = write(tmp_path, """
        [global]
        base = tcp://127.0.0.1
        [jobmanager]
        worker_addr = %(base)s:6000
    """)
    with pytest.raises(SettingsError,
                       match=r"\[jobmanager\] worker_addr: %\(base\)s names no key"):
        load_settings(["-C", conf], {})


def test_a_substitution_in_a_key_no_setting_reads_is_left_alone(tmp_path):
    """A probe's find: ``log_fmt = %(asctime)s`` in [global] (a key for
    another tool) stopped emq-green with exit 2; emq-jobmanager starts."""
    conf = write(tmp_path, """
        [global]
        log_fmt = %(asctime)s %(message)s
        [jobmanager]
        concurrent_jobs = 7
        note = %(nowhere)s
    """)
    settings, _ = load_settings(["-C", conf], {})
    assert settings.concurrent_jobs == 7


def test_eventmq_settings_that_are_not_read_are_named_where_they_mattered(tmp_path, caplog):
    """setup_callable, wal_enabled and the scheduler's Redis keys were
    ignored without a word; EventMQ's defaults (its sample file) are not
    worth a warning."""
    from emq_green.cli import warn_misplaced

    conf = write(tmp_path, """
        [jobmanager]
        setup_path = app.boot
        setup_callable = start
        [router]
        wal_enabled = true
        wal = /var/log/eventmq/wal.log
        [scheduler]
        rq_host = localhost
        rq_port = 6380
    """)
    env = {"EVENTMQ_RQ_PASSWORD": "secret"}
    found = {section: load_settings(["-C", conf], env, section=section)[1].eventmq_unread
             for section in ("jobmanager", "router", "scheduler")}
    assert sorted(found["jobmanager"]) == ["setup_callable", "setup_path"]
    assert sorted(found["router"]) == ["wal_enabled"]  # wal is EventMQ's default
    assert sorted(found["scheduler"]) == ["rq_password", "rq_port"]
    assert "scheduler_file" in found["scheduler"]["rq_port"][1]
    quiet = write(tmp_path, "[router]\nwal_enabled = False\n", name="quiet.conf")
    assert load_settings(["-C", quiet], {}, section="router")[1].eventmq_unread == {}

    _, ns = load_settings(["-C", conf], {}, section="router")
    with caplog.at_level(logging.WARNING, logger="emq_green.cli"):
        warn_misplaced("emq-green-router", "router", ns)
    assert [r.getMessage() for r in caplog.records] == [
        "wal_enabled = true: an EventMQ setting emq-green-router does not read; guaranteed "
        "requests are kept in journal_file"]


@pytest.mark.parametrize("name, ok", [("my box", True), ("box-1", True),
                                      ("  ", False), ("a\nb", False), ("a\tb", False),
                                      ("a\x1bb", False)])
def test_a_name_may_have_spaces_as_in_eventmq_but_no_line_break(name, ok):
    """``-n "my box"`` was refused (EventMQ takes it); a line break would
    forge log lines."""
    if ok:
        assert load_settings(["-n", name], {})[0].name == name
    else:
        with pytest.raises(SettingsError, match="name: .* must be non-empty, printable"):
            load_settings(["-n", name], {})


def test_a_reload_refuses_only_what_was_not_wrong_with_the_file_at_the_start(tmp_path):
    """A reload takes a file gone, or without [jobmanager], for a mistake
    (a probe: a running worker moved to the default router); one that was
    so at the start, as EventMQ reads it, reloads as it started."""
    from emq_green.jobmanager import settings_logging_warnings
    from emq_green.settings import SettingsError

    conf = tmp_path / "eventmq.conf"
    conf.write_text("[global]\nconcurrent_jobs = 7\n")
    env = {"EVENTMQ_CONFIG_FILE": str(conf)}
    settings, ns = load_settings([], env)
    assert settings.concurrent_jobs == 7 and len(ns.config_warnings) == 1  # no [jobmanager]
    reload = lambda: settings_logging_warnings(  # noqa: E731
        lambda: load_settings([], env), reloading=True, known=ns.config_warnings)
    assert reload().concurrent_jobs == 7  # as at the start: reloaded
    conf.unlink()
    with pytest.raises(SettingsError, match="does not exist"):
        reload()
    conf.write_text("[jobmanager]\nconcurrent_jobs = 9\n")
    assert reload().concurrent_jobs == 9
    # a file valid at the start that lost its section is refused
    _s, fine = load_settings([], env)
    conf.write_text("[other]\nconcurrent_jobs = 3\n")
    with pytest.raises(SettingsError, match="no \\[jobmanager\\] section"):
        settings_logging_warnings(lambda: load_settings([], env), reloading=True,
                                  known=fine.config_warnings)


def test_a_reload_is_not_refused_for_warnings_about_values():
    """A review's find: a boolean written EventMQ's way (EVENTMQ_SUPER_DEBUG=1
    means false) or a fractional queue weight made every reload refused:
    only what is wrong with the INI file itself refuses one."""
    from emq_green.jobmanager import settings_logging_warnings

    for env in ({"EVENTMQ_SUPER_DEBUG": "1"}, {"EVENTMQ_QUEUES": '[[1.5, "a"]]'}):
        settings, ns = load_settings([], env)
        assert ns.start_warnings and not ns.config_warnings
        assert settings_logging_warnings(lambda env=env: load_settings([], env),
                                         reloading=True) is not None


def test_a_directory_given_for_a_key_file_and_the_reverse_are_named_as_such(tmp_path):
    """A probe's nit: a directory given for a key file, or a file for the
    authorized-keys directory, was "no such file" / "no such directory"."""
    afile = tmp_path / "a.key"
    afile.write_text("x")
    with pytest.raises(SettingsError, match="is a directory: a file is needed"):
        load_settings(["--curve-secret-key-file", str(tmp_path)], {})
    with pytest.raises(SettingsError, match="is a file: a directory is needed"):
        load_settings(["--curve-authorized-keys", str(afile)], {}, section="router")
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(["--curve-secret-key-file", str(tmp_path / "none")], {})
