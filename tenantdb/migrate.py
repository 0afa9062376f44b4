"""Safe migrations around pyway: one runner at a time, checked files, and undo.

pyway applies the versioned SQL in ``tenantdb/migrations``, then in each application
location (``--location PATH``, ``TENANTDB_MIGRATION_LOCATIONS``); it is GPL and heavy, so it
is run as a tool (``python -m pyway.scripts.main``), never imported. What pyway lacks is
added here: an advisory lock (pyway has none, so two concurrent deploys would both apply a
file), a refusal of destructive forward migrations, ``info`` as data, undo scripts (kept in
a sibling ``<folder>_undo`` because pyway treats every file in its folder as a migration),
a history table per location (``tenantdb_schema_history_<folder name>``) so an
application's ``V01_01`` never collides with the package's, and a refusal to record an
application location whose new tenant tables are not protected.

The process holding the lock is the one whose child does the work: the pyway child gets a
parent-death signal (Linux), and a run that takes the lock first ends any backend a killed
run left behind (they carry :data:`PYWAY_APPLICATION_NAME`), so a rerun after a kill
converges. Each history table has a unique index on ``version``: a version is never
recorded twice.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from .check import Violation, table_violations
from .db import owner_database_url as database_url
from .errors import ConfigurationError, MigrationError
from .settings import get_settings

__all__ = [
    "HISTORY_TABLE",
    "MIGRATIONS_DIR",
    "PACKAGE_LOCATION",
    "PYWAY_APPLICATION_NAME",
    "UNDO_DIR",
    "AppliedMigration",
    "Location",
    "MigrationFile",
    "MigrationInfo",
    "down_to",
    "find_destructive_statements",
    "info",
    "local_migrations",
    "location",
    "migrate",
    "migration_locations",
    "parse_version",
]

log = logging.getLogger(__name__)

# The package is installed as plain files (no zip imports), so its folders are real paths
# that pyway can list.
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
UNDO_DIR = Path(__file__).parent / "migrations_undo"
HISTORY_TABLE = "tenantdb_schema_history"
#: The ``application_name`` of pyway's connections: a backend carrying it while this run
#: holds the lock was left by a killed run.
PYWAY_APPLICATION_NAME = "tenantdb migrate (pyway)"
PACKAGE_NAME = "tenantdb"
_NAME_RE = re.compile(r"[^a-z0-9_]+")
_MAX_NAME = 63 - len(HISTORY_TABLE) - 1  # PostgreSQL truncates identifiers at 63 bytes
# The pyway child: it arms the parent-death signal first (prctl PR_SET_PDEATHSIG=SIGKILL via
# ctypes, Linux), checks its parent is still the runner that holds the lock (it may have
# died before the signal was armed), then runs pyway's command line in this same process.
# Done in the child's own code rather than a preexec_fn, which is unsafe in a threaded
# parent. argv: the runner's pid, then pyway's arguments.
PYWAY_CHILD_CODE = """\
import ctypes, os, runpy, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit("tenantdb migrate: the runner died before pyway started")
sys.argv = ["pyway", *sys.argv[2:]]
runpy.run_module("pyway.scripts.main", run_name="__main__", alter_sys=True)
"""
LOCK_KEY = int.from_bytes(b"tenantdb", "big") >> 1  # a stable bigint shared by all runners
# pyway's own naming rule: V<major>_<minor>[_<patch>]__<description>.sql
FILE_NAME_RE = re.compile(r"^V(\d+)[._](\d+)(?:[._](\d+))?__\w+\.sql$", re.IGNORECASE)
_PYWAY_TIMEOUT_S = 600

HISTORY_EXISTS_SQL = "SELECT to_regclass(%s) IS NOT NULL"
HISTORY_ROWS_SQL = sql.SQL(
    "SELECT version, name, checksum, apply_timestamp FROM {} ORDER BY installed_rank"
)
DELETE_HISTORY_SQL = sql.SQL("DELETE FROM {} WHERE version = %s")
DROP_EMPTY_HISTORY_SQL = sql.SQL("DROP TABLE IF EXISTS {}")
# pyway's own table definition (it creates it "if not exists"), created first so that the
# unique index exists before the first version is recorded.
CREATE_HISTORY_SQL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (installed_rank serial PRIMARY KEY, "
    "version varchar(20) NOT NULL, extension varchar(20) NOT NULL, "
    "name varchar(125) NOT NULL, checksum varchar(25) NOT NULL, "
    "apply_timestamp timestamp DEFAULT NOW())"
)
UNIQUE_VERSION_SQL = sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} (version)")
# Backends of pyway runs whose runner died: nobody else runs pyway while we hold the lock.
# pg_terminate_backend(pid, timeout) waits (up to 10 s) until the backend is gone, so its
# uncommitted file is rolled back before this run applies the same file.
END_ORPHANS_SQL = """
    SELECT pid, pg_terminate_backend(pid, 10000) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = %s AND pid <> pg_backend_pid()
"""

_COMMENT_OR_STRING = re.compile(
    r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|(\$\w*\$).*?\1", re.DOTALL
)
_DESTRUCTIVE = {
    "DROP TABLE": re.compile(r"\bDROP\s+TABLE\b"),
    "DROP COLUMN": re.compile(r"\bDROP\s+COLUMN\b"),
    "ALTER ... DROP": re.compile(r"\bALTER\b[^;]*?\bDROP\b"),
    "TRUNCATE": re.compile(r"\bTRUNCATE\b"),
    "RENAME": re.compile(r"\bRENAME\b"),
    "type change": re.compile(r"\bALTER\b[^;]*?\bTYPE\b"),
}


@dataclass(frozen=True)
class Location:
    """A folder of forward migrations, with its undo folder and its own history table.

    :param name: ``tenantdb`` for the package's own; else the folder's name, lower-cased.
    """

    name: str
    path: Path
    undo_dir: Path
    history_table: str

    @property
    def is_package(self) -> bool:
        return self.name == PACKAGE_NAME

    def qualified(self, file_name: str) -> str:
        """How a file is named in results: bare for the package, ``name/file`` otherwise."""
        return file_name if self.is_package else f"{self.name}/{file_name}"


PACKAGE_LOCATION = Location(PACKAGE_NAME, MIGRATIONS_DIR, UNDO_DIR, HISTORY_TABLE)


def location(path: Path | str) -> Location:
    """The application location at ``path``: undo scripts in the sibling folder
    ``<folder>_undo``, history in ``tenantdb_schema_history_<folder name>``.

    :raises MigrationError: ``path`` is not a folder, or its name makes no table name.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise MigrationError(f"migration location {path}: not a folder")
    if folder == MIGRATIONS_DIR.resolve():
        return PACKAGE_LOCATION
    name = _NAME_RE.sub("_", folder.name.lower()).strip("_")[:_MAX_NAME]
    if not name or name == PACKAGE_NAME:
        raise MigrationError(f"migration location {path}: rename the folder (its name "
                             f"{folder.name!r} names its history table)")
    return Location(name, folder, folder.with_name(folder.name + "_undo"),
                    f"{HISTORY_TABLE}_{name}")


def migration_locations(extra: Iterable[Path | str] = ()) -> list[Location]:
    """The package's location, then ``TENANTDB_MIGRATION_LOCATIONS``'s, then ``extra``
    (each folder once).

    :raises MigrationError: a location is not a folder, or two share a folder name (they
        would share a history table).
    """
    found = [PACKAGE_LOCATION]
    for path in [*get_settings().migration_locations, *extra]:
        loc = location(path)
        if any(loc.path.resolve() == known.path.resolve() for known in found):
            continue
        clash = next((known for known in found if known.name == loc.name), None)
        if clash is not None:
            raise MigrationError(f"migration locations {clash.path} and {loc.path} share the "
                                 f"name {loc.name!r} (and so a history table): rename one")
        found.append(loc)
    return found


@dataclass(frozen=True)
class MigrationFile:
    """A forward migration file."""

    version: str
    name: str
    path: Path

    @property
    def checksum(self) -> str:
        """pyway's checksum of the file: CRC32 over its lines, upper-case hex."""
        crc = 0
        with self.path.open("rb") as fh:
            for line in fh:
                crc = zlib.crc32(line, crc)
        return f"{crc & 0xFFFFFFFF:X}"

    @property
    def undo_path(self) -> Path:
        folder = self.path.parent
        return folder.with_name(folder.name + "_undo") / self.name


@dataclass(frozen=True)
class AppliedMigration:
    """A row of pyway's history table."""

    version: str
    name: str
    checksum: str
    applied_at: datetime | None


@dataclass(frozen=True)
class MigrationInfo:
    """One version as ``tenantdb migrate --info`` shows it."""

    version: str
    name: str
    state: str  # "applied", "pending", "changed" (applied, file edited) or "missing" (no file)
    applied_at: datetime | None
    location: str = PACKAGE_NAME


def parse_version(text: str) -> str:
    """Normalise ``1.1``, ``01_01`` or ``0`` to pyway's form (``01.01``; ``0`` stays ``0``).

    :raises ValueError: not a version.
    """
    parts = re.split(r"[._]", text.strip())
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a migration version (e.g. 01.02, or 0 for none)")
    if all(int(p) == 0 for p in parts):
        return "0"
    return ".".join(f"{int(p):02}" for p in parts)


def local_migrations(directory: Path = MIGRATIONS_DIR) -> list[MigrationFile]:
    """The forward migrations in ``directory``, oldest first.

    :raises MigrationError: a file there is not a valid pyway migration name.
    """
    found = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        match = FILE_NAME_RE.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path}: not a pyway migration name (V01_02__description.sql); pyway "
                "treats every file in its folder as a migration"
            )
        version = ".".join(f"{int(g):02}" for g in match.groups() if g is not None)
        found.append(MigrationFile(version, path.name, path))
    return sorted(found, key=lambda m: _version_key(m.version))


def find_destructive_statements(script: str) -> list[str]:
    """Name each destructive kind of statement in ``script`` (comments and strings ignored)."""
    code = _COMMENT_OR_STRING.sub(" ", script).upper()
    return [kind for kind, pattern in _DESTRUCTIVE.items() if pattern.search(code)]


def migrate(url: str | None = None, locations: Iterable[Path | str] = ()) -> list[str]:
    """Validate applied checksums, then apply pending migrations of the package and of each
    location (see :func:`migration_locations`); returns the files applied (an application
    location's as ``name/file``).

    Concurrent runners queue on an advisory lock, so each version is applied exactly once.
    After each application location, its new tenant tables must pass the checks of
    ``tenantdb check`` (what ``SELECT tenantdb_protect('table')`` ensures): otherwise the
    versions just applied are not recorded and the run fails naming every violation.

    :raises MigrationError: a destructive forward migration, an edited applied file, an
        unprotected new tenant table, or a failure in pyway (its message is kept).
    """
    all_locations = migration_locations(locations)
    for loc in all_locations:  # every file of every location checked before any SQL
        for migration in local_migrations(loc.path):
            kinds = find_destructive_statements(migration.path.read_text())
            if kinds:
                raise MigrationError(
                    f"{loc.qualified(migration.name)}: forward migrations are additive, "
                    f"found {', '.join(kinds)}; put it in an undo script")
    url = url or database_url()
    applied: list[str] = []
    with _locked_connection(url) as conn:
        _end_orphans(conn)
        for loc in all_locations:
            applied += _migrate_location(conn, url, loc)
        _after_migrations(conn)
    return applied


def _after_migrations(conn: psycopg2.extensions.connection) -> None:
    """On a Citus coordinator, distribute the schema (a no-op elsewhere); under the lock."""
    from .citus import distribute

    for change in distribute(conn):
        # A foreign-key action left out changes behaviour: say so where it is seen.
        (log.warning if "left out" in change else log.info)("citus: %s", change)


def _migrate_location(conn: psycopg2.extensions.connection, url: str,
                      loc: Location) -> list[str]:
    _prepare_history(conn, loc.history_table)
    before = {m.version for m in _history(conn, loc.history_table)}
    violations_before = None if loc.is_package else _violations(conn)
    _run_pyway("migrate", url, loc)
    new = [m for m in _history(conn, loc.history_table) if m.version not in before]
    if violations_before is not None:
        unprotected = [v for v in _violations(conn) if v not in violations_before]
        if unprotected:
            _forget(conn, loc.history_table, [m.version for m in new])
            listed = "; ".join(map(str, unprotected))
            raise MigrationError(
                f"{loc.name}: not recorded, {len(unprotected)} tenancy violation(s): {listed}. "
                "Call SELECT tenantdb_protect('<table>') after CREATE TABLE and rerun")
    return [loc.qualified(m.name) for m in new]


def info(url: str | None = None, locations: Iterable[Path | str] = ()) -> list[MigrationInfo]:
    """Every version of every location, applied or pending, with its state."""
    all_locations = migration_locations(locations)
    rows = []
    with _connection(url or database_url()) as conn:
        for loc in all_locations:
            rows += _info(conn, loc)
    return rows


def _info(conn: psycopg2.extensions.connection, loc: Location) -> list[MigrationInfo]:
    applied = {m.version: m for m in _history(conn, loc.history_table)}
    local = {m.version: m for m in local_migrations(loc.path)}
    rows = []
    for version in sorted(applied.keys() | local.keys(), key=_version_key):
        row, file = applied.get(version), local.get(version)
        if row is None and file is not None:
            rows.append(MigrationInfo(version, file.name, "pending", None, loc.name))
        elif row is not None:
            state = "missing" if file is None else (
                "applied" if file.checksum == row.checksum else "changed")
            rows.append(MigrationInfo(version, row.name, state, row.applied_at, loc.name))
    return rows


def down_to(version: str, url: str | None = None,
            locations: Iterable[Path | str] = ()) -> list[str]:
    """Undo applied migrations newer than ``version``, newest first; returns the files undone.

    ``version`` is the package's (``01.03``), or an application location's prefixed with
    its name (``trip_notes:01.01``). ``"0"`` undoes everything: every application location
    first (the newest first), then the package, and removes the history tables. Each undo
    script runs in one transaction together with removing its history row, so a failure
    leaves every version either applied or undone.

    :raises ValueError: ``version`` is not a version, or names no location.
    :raises MigrationError: an undo script is missing (nothing is undone then).
    """
    all_locations = migration_locations(locations)
    name, _, number = version.rpartition(":")
    target = parse_version(number)
    if name:
        chosen = [loc for loc in all_locations if loc.name == name]
        if not chosen:
            known = ", ".join(loc.name for loc in all_locations)
            raise ValueError(f"--down-to {version}: no location named {name!r} (known: {known})")
    else:
        chosen = list(reversed(all_locations)) if target == "0" else [PACKAGE_LOCATION]
    with _locked_connection(url or database_url()) as conn:
        plans = [(loc, [m for m in reversed(_history(conn, loc.history_table))
                        if _version_key(m.version) > _version_key(target)])
                 for loc in chosen]
        missing = [str(loc.undo_dir / m.name) for loc, todo in plans for m in todo
                   if not (loc.undo_dir / m.name).exists()]
        if missing:
            raise MigrationError(f"no undo script {', '.join(missing)}")
        undone = []
        for loc, todo in plans:
            for migration in todo:
                _undo_one(conn, loc, migration)
                undone.append(loc.qualified(migration.name))
            if target == "0":
                with conn, conn.cursor() as cur:
                    cur.execute(DROP_EMPTY_HISTORY_SQL.format(sql.Identifier(loc.history_table)))
        return undone


def _undo_one(conn: psycopg2.extensions.connection, loc: Location,
              migration: AppliedMigration) -> None:
    script = (loc.undo_dir / migration.name).read_text()
    try:
        with conn, conn.cursor() as cur:  # one transaction: the undo and its history row
            cur.execute(script)
            cur.execute(DELETE_HISTORY_SQL.format(sql.Identifier(loc.history_table)),
                        (migration.version,))
    except psycopg2.Error as exc:
        raise MigrationError(
            f"undo of {loc.qualified(migration.name)} failed: {exc}".strip()) from exc


def _history(conn: psycopg2.extensions.connection,
             table: str = HISTORY_TABLE) -> list[AppliedMigration]:
    with conn, conn.cursor() as cur:
        cur.execute(HISTORY_EXISTS_SQL, (table,))
        row = cur.fetchone()
        if row is None or not row[0]:
            return []
        cur.execute(HISTORY_ROWS_SQL.format(sql.Identifier(table)))
        return [AppliedMigration(*r) for r in cur.fetchall()]


def _prepare_history(conn: psycopg2.extensions.connection, table: str) -> None:
    """The history table, with a unique index on ``version`` (made under the lock)."""
    try:
        with conn, conn.cursor() as cur:
            cur.execute(CREATE_HISTORY_SQL.format(sql.Identifier(table)))
            cur.execute(UNIQUE_VERSION_SQL.format(sql.Identifier(f"{table}_version_key"),
                                                  sql.Identifier(table)))
    except psycopg2.errors.UniqueViolation as exc:
        raise MigrationError(
            f"{table} records a version twice (from a run before versions were unique): "
            f"delete the duplicate rows, keeping the oldest of each; {exc}".strip()) from exc


def _forget(conn: psycopg2.extensions.connection, table: str, versions: list[str]) -> None:
    with conn, conn.cursor() as cur:
        for version in versions:
            cur.execute(DELETE_HISTORY_SQL.format(sql.Identifier(table)), (version,))


def _violations(conn: psycopg2.extensions.connection) -> list[Violation]:
    with conn, conn.cursor() as cur:
        return list(table_violations(cur))


def _end_orphans(conn: psycopg2.extensions.connection) -> None:
    with conn, conn.cursor() as cur:
        cur.execute(END_ORPHANS_SQL, (PYWAY_APPLICATION_NAME,))
        cur.fetchall()


@contextmanager
def _connection(url: str) -> Iterator[psycopg2.extensions.connection]:
    try:
        conn = psycopg2.connect(url)
    except psycopg2.Error as exc:
        raise MigrationError(f"cannot connect to the database: {exc}".strip()) from exc
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _locked_connection(url: str) -> Iterator[psycopg2.extensions.connection]:
    """A connection holding the migration lock (session-level, released on close)."""
    with _connection(url) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        conn.autocommit = False
        yield conn


def _run_pyway(command: str, url: str, loc: Location = PACKAGE_LOCATION) -> str:
    params = psycopg2.extensions.parse_dsn(url)
    args = [
        sys.executable, "-c", PYWAY_CHILD_CODE, str(os.getpid()), command,
        "--database-type", "postgres",
        "--database-table", loc.history_table,
        "--database-migration-dir", str(loc.path.resolve()),
        "--database-host", params.get("host") or "localhost",
        "--database-name", params.get("dbname") or "postgres",
        "--database-username", params.get("user") or "postgres",
    ]
    if params.get("port"):
        args += ["--database-port", str(params["port"])]
    env = dict(os.environ)  # pyway reads the password from its environment, never argv
    env["PYWAY_DATABASE_PASSWORD"] = params.get("password", "")
    env["PGAPPNAME"] = PYWAY_APPLICATION_NAME  # libpq's variable: marks pyway's backends
    # Run beside the SQL folder so a .pyway.conf in the caller's directory is not merged in.
    try:
        done = subprocess.run(args, cwd=MIGRATIONS_DIR.parent, env=env, capture_output=True,
                              text=True, timeout=_PYWAY_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"cannot run pyway: {exc}") from exc
    except subprocess.TimeoutExpired as exc:  # run() killed the child
        raise MigrationError(f"pyway {command} ran over {_PYWAY_TIMEOUT_S} s") from exc
    if re.search(r"No module named '?pyway", done.stderr):
        raise ConfigurationError("migrations need the extra: pip install 'tenantdb[migrate]'")
    if done.returncode != 0:
        prefix = "" if loc.is_package else f"{loc.name}: "
        raise MigrationError(f"{prefix}pyway {command} failed: {_last_error(done.stderr)}")
    return done.stdout


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return re.sub(r"\x1b\[[0-9;]*m", "", (errors or lines or ["no output"])[-1])


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))
