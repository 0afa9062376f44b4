"""The exception tree of tenantdb: one root, the tenancy family under it."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "CrossOrgError",
    "MigrationError",
    "MissingOrgError",
    "SeedError",
    "TenancyError",
    "TenantDBError",
    "UnscopedQueryError",
]


class TenantDBError(Exception):
    """Root of every error tenantdb raises on purpose."""


class ConfigurationError(TenantDBError):
    """Something tenantdb needs is not configured or not installed."""


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
