"""Helpers of tenantdb's own suite that test modules import (fixtures live in conftest)."""

from __future__ import annotations

import logging
import os
import sys
import threading

from tenantdb.db import execute_once as admin_execute

__all__ = ["PYTHON", "StatementLog", "admin_execute", "cli_env"]

#: The interpreter running the suite, for `python -m tenantdb` subprocesses.
PYTHON = sys.executable


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m tenantdb` subprocess: no inherited tenantdb URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENANTDB_", "PG"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


class StatementLog(logging.Handler):
    """The statements peewee sends from this thread (peewee logs each at DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.statements: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.statements.append(str(record.msg))
