"""tenantdb: the multi-tenant data layer of a SaaS backend on PostgreSQL + pgvector and Redis."""

from __future__ import annotations

from .context import cross_org, require_org
from .db import close, connect, database
from .errors import (
    ClaimInTransactionError,
    ConfigurationError,
    CrossOrgError,
    IdempotencyError,
    KeyNotClaimedError,
    MigrationError,
    MissingOrgError,
    PurgeInTransactionError,
    SeedError,
    TenancyError,
    TenantDBError,
    UnknownUserError,
    UnscopedQueryError,
)
from .orgs import create_org, delete_org
from .repository import TenantRepository, scoped_count, scoped_get, scoped_list, scoped_query
from .scoping import execute_scoped
from .settings import Settings, get_settings
from .tenancy import TenantForeignKey, TenantModel, prefetch

__all__ = [
    "ClaimInTransactionError",
    "ConfigurationError",
    "CrossOrgError",
    "IdempotencyError",
    "KeyNotClaimedError",
    "MigrationError",
    "MissingOrgError",
    "PurgeInTransactionError",
    "SeedError",
    "Settings",
    "TenancyError",
    "TenantDBError",
    "TenantForeignKey",
    "TenantModel",
    "TenantRepository",
    "UnknownUserError",
    "UnscopedQueryError",
    "__version__",
    "close",
    "connect",
    "create_org",
    "cross_org",
    "database",
    "delete_org",
    "execute_scoped",
    "get_settings",
    "prefetch",
    "require_org",
    "scoped_count",
    "scoped_get",
    "scoped_list",
    "scoped_query",
]

__version__ = "0.1.0"
