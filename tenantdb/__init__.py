"""tenantdb: the multi-tenant data layer of a SaaS backend on PostgreSQL + pgvector and Redis."""

from __future__ import annotations

from .db import close, connect, database
from .errors import (
    ConfigurationError,
    CrossOrgError,
    MigrationError,
    MissingOrgError,
    SeedError,
    TenancyError,
    TenantDBError,
    UnscopedQueryError,
)
from .settings import Settings, get_settings
from .tenancy import TenantModel, cross_org

__all__ = [
    "ConfigurationError",
    "CrossOrgError",
    "MigrationError",
    "MissingOrgError",
    "SeedError",
    "Settings",
    "TenancyError",
    "TenantDBError",
    "TenantModel",
    "UnscopedQueryError",
    "__version__",
    "close",
    "connect",
    "cross_org",
    "database",
    "get_settings",
]

__version__ = "0.1.0"
