"""The ``tenantdb`` command (also ``python -m tenantdb``).

Subcommands call the public API; only :func:`main` prints errors (one line on stderr) and
sets the exit code.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import peewee
import psycopg2
import psycopg2.extensions
from playhouse.pool import MaxConnectionsExceeded

from . import citus_dev, embedded, migrate
from .db import connect, owner_database_url
from .errors import TenantDBError
from .settings import get_settings
from .validation import check_int

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (TenantDBError, ValueError, peewee.PeeweeException, psycopg2.Error,
            MaxConnectionsExceeded) as exc:
        # One line, never a traceback: tenantdb's own errors already say what to do; a
        # driver error that escaped a boundary is still reported, not dumped.
        print(f"tenantdb {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg2.OperationalError):
        text += (" (check TENANTDB_OWNER_DATABASE_URL / TENANTDB_DATABASE_URL and that the "
                 "server is running)")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenantdb",
        description="tenantdb: migrations, seeds, schema checks, retention, reports, dev servers.",
    )
    sub = parser.add_subparsers(dest="command")

    dev = sub.add_parser("dev", help="embedded PostgreSQL + Redis for development")
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument("--citus", action="store_true",
                     help="up: a Citus coordinator + two workers instead of one PostgreSQL")
    dev.set_defaults(handler=_dev)

    mig = sub.add_parser("migrate", help="apply (or list, or undo) schema migrations")
    mode = mig.add_mutually_exclusive_group()
    mode.add_argument("--info", action="store_true", help="list applied and pending versions")
    mode.add_argument("--down-to", metavar="[LOCATION:]VERSION",
                      help="undo versions newer than VERSION, newest first (0: all); "
                           "LOCATION: an application location's name (default: the package)")
    _location_option(mig)
    mig.set_defaults(handler=_migrate)

    table = sub.add_parser(
        "new-table", help="write a tenant table's migration, its undo and a model to start from")
    table.add_argument("name", help="the table's name (lower case, e.g. trip_note)")
    table.add_argument("--location", metavar="PATH", type=Path,
                       help="the migrations folder (default: the first of "
                            "TENANTDB_MIGRATION_LOCATIONS, else ./migrations)")
    table.set_defaults(handler=_new_table)

    seed = sub.add_parser("seed", help="load seed files (idempotent)")
    seed.add_argument("path", nargs="?", help="a file or folder (default: ./seeds)")
    seed.add_argument("--demo", action="store_true",
                      help="load the demo seeds shipped with the package")
    _models_option(seed)
    seed.set_defaults(handler=_seed)

    check = sub.add_parser("check", help="lint the schema against the tenancy rules")
    _location_option(check)
    check.set_defaults(handler=_check)

    report = sub.add_parser("report", help="per-org row counts")
    _models_option(report)
    report.set_defaults(handler=_report)

    pgenv = sub.add_parser("pgenv", help="print PG* variables for psql and plain pyway")
    pgenv.set_defaults(handler=_pgenv)

    retention = sub.add_parser(
        "retention", help="stale rows per retention policy (a dry run unless --purge)")
    retention.add_argument("--purge", action="store_true",
                           help="delete stale rows and scrub stale tool logs (default: count)")
    retention.add_argument("--org", metavar="ORG_ID", help="one org (default: every org)")
    retention.add_argument("--batch-size", type=int, default=1000, metavar="N",
                           help="rows per batch, each committed on its own (default: 1000)")
    _models_option(retention)  # an application's models register its retention policies
    retention.set_defaults(handler=_retention)
    return parser


def _location_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--location", metavar="PATH", action="append", default=[], type=Path,
                        help="an application's migrations folder, applied after the "
                             "package's (repeatable; added to TENANTDB_MIGRATION_LOCATIONS)")


def _models_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", metavar="MODULE", action="append", default=[],
                        help="import an application's models module first, so its tables "
                             "count (repeatable, e.g. travel_api.models)")


def _import_models(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"--models {module}: cannot import it ({exc}); run from the "
                             "application's folder or set PYTHONPATH") from exc


def _dev(args: argparse.Namespace) -> int:
    home = get_settings().home
    if args.citus or citus_dev.running_cluster(home) is not None:
        return _dev_citus(args, home)
    if args.action == "up":
        settings = get_settings()
        if settings.database_url and settings.redis_url:
            print("# TENANTDB_DATABASE_URL and TENANTDB_REDIS_URL are set: nothing to start")
            return 0
        urls = embedded.start(home)
        # A URL the user set wins: print only what points at the embedded servers instead.
        keep_db = settings.database_url is not None
        for line in urls.exports():
            if not (keep_db and ("DATABASE_URL" in line or line.startswith("export PG"))):
                print(line)
        return 0
    servers = embedded.stop(home) if args.action == "down" else embedded.status(home)
    verb = "stopped" if args.action == "down" else "running"
    for server in servers:
        state = f"{verb} (pid {server.pid})" if server.pid else "not running"
        print(f"{server.name:<9} {state:<24} {server.path.resolve()}")
    return 0


def _dev_citus(args: argparse.Namespace, home: Path) -> int:
    """``dev --citus``: the Citus cluster, with the embedded Redis beside it."""
    if args.action == "up":
        cluster = citus_dev.start(home, get_settings().pg_bin)
        redis_url = get_settings().redis_url or embedded.start_redis(home)
        for line in [*cluster.exports(), f"export TENANTDB_REDIS_URL='{redis_url}'"]:
            print(line)
        return 0
    nodes = citus_dev.stop(home) if args.action == "down" else citus_dev.status(home)
    if args.action == "down":
        embedded.stop(home)
    verb = "stopped" if args.action == "down" else "running"
    for name, pid, path in nodes:
        state = f"{verb} (pid {pid})" if pid else "not running"
        print(f"{name:<12} {state:<24} {path}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    if args.info:
        for row in migrate.info(locations=args.location):
            when = row.applied_at.isoformat(" ", "seconds") if row.applied_at else ""
            print(f"{row.location:<12} {row.version:<8} {row.state:<8} {when:<20} {row.name}")
        return 0
    if args.down_to is not None:
        undone = migrate.down_to(args.down_to, locations=args.location)
        print("\n".join(f"undone  {name}" for name in undone) or "nothing to undo")
        return 0
    applied = migrate.migrate(locations=args.location)
    print("\n".join(f"applied {name}" for name in applied) or "schema is up to date")
    return 0


TABLE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
NEW_TABLE_SQL = """\
-- {name}: a tenant table of the application (from `tenantdb new-table`).
-- Keys lead with org_id and foreign keys to tenant tables are composite, e.g.
--     CONSTRAINT {name}_destination_fkey FOREIGN KEY (org_id, destination_id)
--         REFERENCES destination (org_id, id) ON DELETE CASCADE
-- tenantdb_protect() checks the rules, then enables and forces row-level security with the
-- standard policies and grants the application and admin roles. Re-runnable.
CREATE TABLE IF NOT EXISTS {name} (
    org_id      uuid        NOT NULL REFERENCES org (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT {name}_pkey PRIMARY KEY (org_id, id)
);
SELECT tenantdb_protect('{name}');
"""
NEW_TABLE_UNDO_SQL = """\
-- Undo of {file}.
DROP TABLE IF EXISTS {name};
"""
NEW_TABLE_MODEL = '''\
"""The model of {name} (from `tenantdb new-table`): keep it in step with its migration."""

from playhouse.postgres_ext import DateTimeTZField

from tenantdb.models import TenantRowModel, utcnow


class {cls}(TenantRowModel):
    """A row of {name}, keyed (org_id, id); relations are tenantdb.tenancy.TenantForeignKey."""

    created_at = DateTimeTZField(default=utcnow)
    updated_at = DateTimeTZField(default=utcnow)

    class Meta:
        table_name = "{name}"
'''


def _new_table(args: argparse.Namespace) -> int:
    from .models import ALL_MODELS

    name = args.name
    if not TABLE_NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a table name: lower-case letters, digits and _, "
                         "starting with a letter (up to 48)")
    if name in {model._meta.table_name for model in ALL_MODELS}:
        raise ValueError(f"{name!r} is one of tenantdb's own tables: choose another name")
    folder: Path = args.location or next(iter(get_settings().migration_locations),
                                         Path("migrations"))
    if folder.resolve() == migrate.MIGRATIONS_DIR.resolve():
        raise ValueError(f"{folder} is tenantdb's own migrations folder: give the "
                         "application's with --location PATH")
    existing = migrate.local_migrations(folder) if folder.is_dir() else []
    if existing:
        major, minor = (int(p) for p in existing[-1].version.split(".")[:2])
        version = f"V{major:02}_{minor + 1:02}"
    else:
        version = "V01_01"
    file = f"{version}__create_{name}.sql"
    model_path = folder.parent / f"{name}_model.py"
    cls = "".join(part.capitalize() for part in name.split("_"))
    writes = {folder / file: NEW_TABLE_SQL.format(name=name),
              folder.with_name(folder.name + "_undo") / file:
                  NEW_TABLE_UNDO_SQL.format(name=name, file=file),
              model_path: NEW_TABLE_MODEL.format(name=name, cls=cls)}
    taken = [str(path) for path in writes if path.exists()]
    if taken:  # nothing is written unless everything can be
        raise ValueError(f"{', '.join(taken)} already exists: nothing written")
    for path, text in writes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def _seed(args: argparse.Namespace) -> int:
    from .seeds import DEMO_SEEDS, load_seeds

    if args.demo and args.path:
        raise ValueError("give a PATH or --demo, not both")
    path = DEMO_SEEDS if args.demo else Path(args.path or "seeds")
    if not args.demo and args.path is None and not path.exists():
        raise ValueError("no ./seeds folder here: give a PATH, or --demo for the demo seeds")
    _import_models(args.models)
    owner = owner_database_url()
    connect(owner, admin_url=owner)  # seeds are the owner's work, like migrations
    report = load_seeds(path)
    for table, counts in report.tables.items():
        print(f"{table:<16} created {counts.created:>4}  already present {counts.present:>4}")
    print(f"{'total':<16} created {report.created:>4}  already present {report.present:>4}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import check_schema

    violations = check_schema(locations=args.location)
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} violation(s)", file=sys.stderr)
        return 1
    print("schema ok: tenant tables, keys, row-level security and roles follow the rules")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import org_summary

    _import_models(args.models)
    connect()
    summaries = org_summary()
    if not summaries:
        print("no orgs yet: run `tenantdb seed`")
        return 0
    tables = list(summaries[0].counts)
    print(f"{'org':<20} " + " ".join(f"{t:>15}" for t in tables))
    for org in summaries:
        print(f"{org.slug:<20} " + " ".join(f"{org.counts[t]:>15}" for t in tables))
    return 0


def _pgenv(args: argparse.Namespace) -> int:
    url = owner_database_url()  # psql and plain pyway: migrations are the owner's
    if urlsplit(url).scheme not in ("postgres", "postgresql"):
        raise ValueError(f"{url!r} is not a PostgreSQL URL")
    params = psycopg2.extensions.parse_dsn(url)
    # libpq's defaults, spelled out: the shipped .pyway.conf needs every variable set.
    values = {
        "PGHOST": params.get("host") or "localhost",
        "PGPORT": params.get("port") or "5432",
        "PGDATABASE": params.get("dbname") or "postgres",
        "PGUSER": params.get("user") or getpass.getuser(),
    }
    for var, value in values.items():
        print(f"export {var}='{value}'")
    return 0


def _retention(args: argparse.Namespace) -> int:
    from .retention import PURGE_ORDER, get_retention_summary, purge
    from .table_retention import registered_retention_policies

    # Refused before connecting, not after the summary.
    check_int(args.batch_size, "--batch-size", minimum=1)
    _import_models(args.models)  # registers the application's policies
    connect()
    # Without --org the command is explicitly about every org.
    summary = get_retention_summary(org_id=args.org, all_orgs=args.org is None)
    org, every = summary.org_id, summary.org_id is None
    rows = {policy.value: (summary.cutoffs[policy], summary.counts[policy])
            for policy in PURGE_ORDER}
    for name, table_policy in registered_retention_policies().items():
        # The application's policies after the package's, counted against the same now.
        rows[name] = (summary.now - table_policy.window,
                      purge(name, dry_run=True, org_id=org, now=summary.now, all_orgs=every))
    print(f"retention as of {summary.now.isoformat(' ', 'seconds')} "
          f"({f'org {org}' if org else 'every org'})")
    print(f"{'policy':<22} {'stale before':<25} {'rows':>10}")
    for name, (cutoff, count) in rows.items():
        print(f"{name:<22} {cutoff.isoformat(' ', 'seconds'):<25} {count:>10}")
    if not args.purge:
        print("dry run: nothing changed; pass --purge to delete (tool logs: scrub) these rows")
        return 0
    for name, (_, todo) in rows.items():
        progress = _purge_progress(name, todo)
        purged = purge(name, args.batch_size, org_id=org, now=summary.now, on_batch=progress,
                       all_orgs=every)
        print(file=sys.stderr)
        print(f"purged {name}: {purged}")
    return 0


def _purge_progress(name: str, todo: int) -> Callable[[int], None]:
    """Prints ``purging <policy>: done/todo`` on stderr, in place, after each batch."""
    done = 0

    def progress(affected: int) -> None:
        nonlocal done
        done += affected
        print(f"\rpurging {name}: {done}/{max(todo, done)}", end="", file=sys.stderr,
              flush=True)

    return progress
