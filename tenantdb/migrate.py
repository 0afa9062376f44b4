"""Safe migrations around pyway: one runner at a time, checked files, and undo.

pyway applies the versioned SQL in ``tenantdb/migrations``; it is GPL and heavy, so it is run
as a tool (``python -m pyway.scripts.main``), never imported. What pyway lacks is added here:
an advisory lock (pyway has none, so two concurrent deploys would both apply a file), a
refusal of destructive forward migrations, ``info`` as data, and undo scripts (kept in
``tenantdb/migrations_undo`` because pyway treats every file in its folder as a migration).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from .db import database_url
from .errors import ConfigurationError, MigrationError

__all__ = [
    "HISTORY_TABLE",
    "MIGRATIONS_DIR",
    "UNDO_DIR",
    "AppliedMigration",
    "MigrationFile",
    "MigrationInfo",
    "down_to",
    "find_destructive_statements",
    "info",
    "local_migrations",
    "migrate",
    "parse_version",
]

log = logging.getLogger(__name__)

# The package is installed as plain files (no zip imports), so its folders are real paths
# that pyway can list.
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
UNDO_DIR = Path(__file__).parent / "migrations_undo"
HISTORY_TABLE = "tenantdb_schema_history"
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
class MigrationFile:
    """A forward migration shipped with the package."""

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
        return UNDO_DIR / self.name


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
                f"{path.name}: not a pyway migration name (V01_02__description.sql); pyway "
                "treats every file in its folder as a migration"
            )
        version = ".".join(f"{int(g):02}" for g in match.groups() if g is not None)
        found.append(MigrationFile(version, path.name, path))
    return sorted(found, key=lambda m: _version_key(m.version))


def find_destructive_statements(script: str) -> list[str]:
    """Name each destructive kind of statement in ``script`` (comments and strings ignored)."""
    code = _COMMENT_OR_STRING.sub(" ", script).upper()
    return [kind for kind, pattern in _DESTRUCTIVE.items() if pattern.search(code)]


def migrate(url: str | None = None) -> list[str]:
    """Validate applied checksums, then apply pending migrations; returns the names applied.

    Concurrent runners queue on an advisory lock, so each version is applied exactly once.

    :raises MigrationError: a destructive forward migration, an edited applied file, or a
        failure in pyway (its message is kept).
    """
    pending_check = local_migrations()
    for migration in pending_check:
        kinds = find_destructive_statements(migration.path.read_text())
        if kinds:
            raise MigrationError(f"{migration.name}: forward migrations are additive, "
                                 f"found {', '.join(kinds)}; put it in an undo script")
    url = url or database_url()
    with _locked_connection(url) as conn:
        before = {m.version for m in _history(conn)}
        _run_pyway("migrate", url)
        applied = [m.name for m in _history(conn) if m.version not in before]
        _after_migrations(conn)
        return applied


def _after_migrations(conn: psycopg2.extensions.connection) -> None:
    """On a Citus coordinator, distribute the schema (a no-op elsewhere); under the lock."""
    from .citus import distribute

    for change in distribute(conn):
        # A foreign-key action left out changes behaviour: say so where it is seen.
        (log.warning if "left out" in change else log.info)("citus: %s", change)


def info(url: str | None = None) -> list[MigrationInfo]:
    """Every version, applied or pending, with its state."""
    with _connection(url or database_url()) as conn:
        applied = {m.version: m for m in _history(conn)}
    local = {m.version: m for m in local_migrations()}
    rows = []
    for version in sorted(applied.keys() | local.keys(), key=_version_key):
        row, file = applied.get(version), local.get(version)
        if row is None and file is not None:
            rows.append(MigrationInfo(version, file.name, "pending", None))
        elif row is not None:
            state = "missing" if file is None else (
                "applied" if file.checksum == row.checksum else "changed")
            rows.append(MigrationInfo(version, row.name, state, row.applied_at))
    return rows


def down_to(version: str, url: str | None = None) -> list[str]:
    """Undo applied migrations newer than ``version``, newest first; returns the names undone.

    Each undo script runs in one transaction together with removing its history row, so a
    failure leaves every version either applied or undone. ``"0"`` undoes everything and
    removes the history table.

    :raises ValueError: ``version`` is not a version.
    :raises MigrationError: an undo script is missing (nothing is undone then).
    """
    target = parse_version(version)
    with _locked_connection(url or database_url()) as conn:
        to_undo = [m for m in reversed(_history(conn))
                   if _version_key(m.version) > _version_key(target)]
        missing = [m.name for m in to_undo if not (UNDO_DIR / m.name).exists()]
        if missing:
            raise MigrationError(f"no undo script for {', '.join(missing)} in {UNDO_DIR}")
        for migration in to_undo:
            _undo_one(conn, migration)
        if target == "0":
            with conn, conn.cursor() as cur:
                cur.execute(DROP_EMPTY_HISTORY_SQL.format(sql.Identifier(HISTORY_TABLE)))
        return [m.name for m in to_undo]


def _undo_one(conn: psycopg2.extensions.connection, migration: AppliedMigration) -> None:
    script = (UNDO_DIR / migration.name).read_text()
    try:
        with conn, conn.cursor() as cur:  # one transaction: the undo and its history row
            cur.execute(script)
            cur.execute(DELETE_HISTORY_SQL.format(sql.Identifier(HISTORY_TABLE)),
                        (migration.version,))
    except psycopg2.Error as exc:
        raise MigrationError(f"undo of {migration.name} failed: {exc}".strip()) from exc


def _history(conn: psycopg2.extensions.connection) -> list[AppliedMigration]:
    with conn, conn.cursor() as cur:
        cur.execute(HISTORY_EXISTS_SQL, (HISTORY_TABLE,))
        row = cur.fetchone()
        if row is None or not row[0]:
            return []
        cur.execute(HISTORY_ROWS_SQL.format(sql.Identifier(HISTORY_TABLE)))
        return [AppliedMigration(*r) for r in cur.fetchall()]


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


def _run_pyway(command: str, url: str) -> str:
    params = psycopg2.extensions.parse_dsn(url)
    args = [
        sys.executable, "-m", "pyway.scripts.main", command,
        "--database-type", "postgres",
        "--database-table", HISTORY_TABLE,
        "--database-migration-dir", str(MIGRATIONS_DIR),
        "--database-host", params.get("host") or "localhost",
        "--database-name", params.get("dbname") or "postgres",
        "--database-username", params.get("user") or "postgres",
    ]
    if params.get("port"):
        args += ["--database-port", str(params["port"])]
    env = dict(os.environ)  # pyway reads the password from its environment, never argv
    env["PYWAY_DATABASE_PASSWORD"] = params.get("password", "")
    # Run beside the SQL folder so a .pyway.conf in the caller's directory is not merged in.
    try:
        done = subprocess.run(args, cwd=MIGRATIONS_DIR.parent, env=env, capture_output=True,
                              text=True, timeout=_PYWAY_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"cannot run pyway: {exc}") from exc
    if "No module named pyway" in done.stderr:
        raise ConfigurationError("migrations need the extra: pip install 'tenantdb[migrate]'")
    if done.returncode != 0:
        raise MigrationError(f"pyway {command} failed: {_last_error(done.stderr)}")
    return done.stdout


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return re.sub(r"\x1b\[[0-9;]*m", "", (errors or lines or ["no output"])[-1])


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))
