"""CLI commands for reliability: `retry ID` (requeue a dead/failed/cancelled job by hand) and
`recover` (rebuild job state that Redis lost, from the store)."""
from __future__ import annotations

import sys


def cmd_retry(a) -> int:
    from jobs.client import Client
    c = Client(redis_url=a.redis_url, store_url=getattr(a, "store", None), queue=a.queue)
    try:
        c.retry(a.job_id)
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.job_id}: requeued")
    return 0


def cmd_recover(a) -> int:
    from jobs import state
    from jobs.recover import recover
    from storage import open_store
    from storage.base import default_store_url
    r = state.connect(a.redis_url)
    try:
        found = recover(r, state.connect(a.redis_url, decode=False), open_store(a.store or default_store_url()),
                        dry_run=a.dry_run)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for x in found:
        print(f"{x.job_id:26} {x.status:10} done={x.done} failed={x.failed}{' (dry run)' if a.dry_run else ''}")
    print(f"{len(found)} job(s) {'would be ' if a.dry_run else ''}recovered", file=sys.stderr)
    return 0


def add_parsers(sub, common) -> None:
    p = sub.add_parser("retry", help="requeue a dead, failed or cancelled job (committed rows are kept)")
    p.add_argument("job_id")
    common(p)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("recover", help="rebuild job state that Redis lost, from the store")
    p.add_argument("--dry-run", action="store_true", help="only list what would be recovered")
    common(p)
    p.set_defaults(func=cmd_recover)
