"""CLI commands for running prefixq as a service: `schedule`, `scheduler` and `config`."""
from __future__ import annotations

import signal
import sys
import threading


def _redis(a):
    from jobs import state
    return state.connect(a.redis_url)


def cmd_schedule_add(a) -> int:
    from jobs import schedules
    opts = {k: getattr(a, k) for k in schedules.SUBMIT_OPTIONS if getattr(a, k, None) is not None}
    sched = schedules.Schedule(name=a.name, cron=a.cron, input=a.file, options=opts, queue=a.queue)
    try:
        schedules.add(_redis(a), sched, replace=a.replace)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{sched.name}: '{sched.cron}' next at {schedules.next_run(sched):%Y-%m-%d %H:%M:%S %Z}")
    return 0


def cmd_schedule_list(a) -> int:
    from jobs import schedules
    r = _redis(a)
    print(f"{'NAME':20} {'CRON':15} {'NEXT':20} {'LAST RUN':32} INPUT")
    for s in schedules.list_all(r):
        runs = schedules.recent_runs(r, s.name, 1)
        last = "-"
        if runs:
            last = runs[0]["period"][:19] + " " + ("error" if runs[0]["error"] else f"{len(runs[0]['jobs'])} job(s)")
        print(f"{s.name:20} {s.cron:15} {schedules.next_run(s):%Y-%m-%d %H:%M:%S} {last:32} {s.input}")
    return 0


def cmd_schedule_remove(a) -> int:
    from jobs import schedules
    if not schedules.remove(_redis(a), a.name):
        print(f"error: no schedule {a.name!r}", file=sys.stderr)
        return 1
    print(f"{a.name}: removed")
    return 0


def cmd_scheduler(a) -> int:
    from jobs import schedules, state
    sch = schedules.PrefixqScheduler(a.redis_url or state.redis_url(), name=a.name or "")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sch.run(stop, poll_s=a.poll)
    return 0


def cmd_config(a) -> int:
    from jobs import config
    flags = {k: v for k, v in vars(a).items() if k != "func"}
    try:
        settings = config.resolve(flags, getattr(a, "config", None))
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path, _ = config.config_path(getattr(a, "config", None))
    print(f"# config file: {path}{'' if path and path.exists() else ' (absent)'}")
    print(config.render(settings))
    return 0


def add_parsers(sub, common) -> None:
    p = sub.add_parser("schedule", help="recurring jobs: add, list, remove (fired by `prefixq scheduler`)")
    ss = p.add_subparsers(dest="schedule_cmd", required=True)
    q = ss.add_parser("add", help="register a recurring job; FILE may hold {date}, {yesterday}, {period} and globs")
    q.add_argument("--cron", required=True, help='cron expression, scheduler local time, e.g. "0 2 * * *"')
    q.add_argument("--name", required=True)
    q.add_argument("--replace", action="store_true", help="overwrite a schedule of that name")
    q.add_argument("file", help="input: a path or store URL, e.g. s3://bucket/evals/{date}/*.parquet")
    q.add_argument("--model", default=None)
    q.add_argument("--max-tokens", type=int, default=None)
    q.add_argument("--temperature", type=float, default=None)
    q.add_argument("--top-p", type=float, default=None)
    q.add_argument("--output-format", choices=["parquet", "jsonl"], default=None)
    q.add_argument("--split-rows", type=int, default=None)
    common(q)
    q.set_defaults(func=cmd_schedule_add)
    q = ss.add_parser("list", help="schedules with next and last run")
    common(q)
    q.set_defaults(func=cmd_schedule_list)
    q = ss.add_parser("remove", help="delete a schedule")
    q.add_argument("name")
    common(q)
    q.set_defaults(func=cmd_schedule_remove)

    p = sub.add_parser("scheduler", help="run the cron scheduler that fires schedules (safe to run two)")
    p.add_argument("--name", default=None, help="scheduler name (default host:pid:random)")
    p.add_argument("--poll", type=float, default=5.0, help="re-read schedules every N seconds")
    common(p)
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("config", help="show the effective configuration and where each value comes from")
    common(p)
    p.add_argument("--model", default=None)
    p.add_argument("--engine", default=None)
    p.add_argument("--metrics-port", default=None)
    p.add_argument("--split-rows", default=None)
    p.set_defaults(func=cmd_config)

