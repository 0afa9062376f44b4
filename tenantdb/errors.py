"""The exception tree of tenantdb: one root, the tenancy family under it."""

from __future__ import annotations

import peewee
from playhouse.pool import MaxConnectionsExceeded

__all__ = [
    "ClaimInTransactionError",
    "ConfigurationError",
    "ConnectionLostError",
    "CrossOrgError",
    "DatabaseUnavailableError",
    "IdempotencyError",
    "KeyNotClaimedError",
    "MigrationError",
    "MissingOrgError",
    "NotConnectedError",
    "PoolExhaustedError",
    "PurgeInTransactionError",
    "SeedError",
    "StatementTimeoutError",
    "TenancyError",
    "TenantDBError",
    "UnknownUserError",
    "UnscopedQueryError",
]


class TenantDBError(Exception):
    """Root of every error tenantdb raises on purpose."""


class ConfigurationError(TenantDBError):
    """Something tenantdb needs is not configured or not installed."""


# -- the database boundary ----------------------------------------------------------------
# Each wraps a driver error (kept as ``__cause__``) and stays an instance of the Peewee class
# callers caught before tenantdb wrapped it, so existing ``except`` clauses keep working.


class NotConnectedError(TenantDBError, peewee.InterfaceError):
    """The database was used before :func:`tenantdb.connect` bound it."""


class DatabaseUnavailableError(TenantDBError, peewee.OperationalError):
    """A new connection could not be opened (server down, wrong URL, login refused)."""


class PoolExhaustedError(TenantDBError, MaxConnectionsExceeded):  # type: ignore[misc]
    """Every pooled connection stayed in use for the whole wait (``TENANTDB_POOL_TIMEOUT``)."""


class StatementTimeoutError(TenantDBError, peewee.OperationalError):
    """A statement ran longer than ``TENANTDB_STATEMENT_TIMEOUT_MS`` and was cancelled."""


class ConnectionLostError(TenantDBError, peewee.OperationalError, peewee.InterfaceError):
    """The connection died under a statement (server restart, terminated backend, network).

    The connection is discarded; the next call gets a new one."""


class MigrationError(TenantDBError):
    """A migration could not be validated, applied or undone."""


class SeedError(TenantDBError, ValueError):
    """A seed file is invalid; nothing from it was written."""


class TenancyError(TenantDBError):
    """Base of every refusal that protects one org's rows from another org."""


class MissingOrgError(TenancyError, ValueError):
    """No org, or an org that is not a valid UUID, was given for tenant-scoped work."""


class CrossOrgError(TenancyError):
    """A write or a reference would cross from one org to another."""


class UnscopedQueryError(TenancyError):
    """A query reaches a tenant table without its org predicate."""


class IdempotencyError(TenantDBError):
    """Base of the idempotency store's refusals."""


class ClaimInTransactionError(IdempotencyError):
    """``idempotency.begin()`` was called inside an open transaction: racers would block on
    the claim instead of getting a fast "in progress", and a rollback would drop it."""


class KeyNotClaimedError(IdempotencyError):
    """``idempotency.mark_completed()`` found no pending claim of this key with this body."""


class UnknownUserError(IdempotencyError, LookupError):
    """An idempotency key's user does not exist in the key's org."""


class PurgeInTransactionError(TenantDBError):
    """``retention.purge()`` was called inside an open transaction, where its batches could
    not commit on their own."""
