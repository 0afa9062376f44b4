"""A scratch database for a benchmark run, shared by the bench scripts.

On TENANTDB_DATABASE_URL's server if set, else on an embedded server in a temporary folder
(stopped and removed afterwards). The database is created empty and dropped at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from tenantdb import db, embedded
from tenantdb.db import execute_once as admin
from tenantdb.settings import get_settings


@contextmanager
def scratch_database(*, shared_buffers: str | None = None, keep: bool = False) -> Iterator[str]:
    """Yield the URL of a new empty database.

    :param shared_buffers: for an embedded server, restart it with this ``shared_buffers``
        (its default is 128 MB) so that a large data set stays in memory.
    :param keep: leave the database (and the embedded server) behind for inspection.
    """
    home = None
    server = get_settings().owner_database_url or get_settings().database_url
    if server is None:
        home = Path(tempfile.mkdtemp(prefix="tdb-bench-"))
        server = embedded.start(home).owner_database_url
        if shared_buffers is not None:
            admin(server, f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
            embedded.stop(home)
            server = embedded.start(home).owner_database_url
    name = f"tenantdb_bench_{uuid.uuid4().hex[:8]}"
    admin(server, f"CREATE DATABASE {name}")
    try:
        yield urlsplit(server)._replace(path=f"/{name}").geturl()
    finally:
        db.close()
        if keep:
            print(f"kept {name} on {server}")
        else:
            admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            if home is not None:
                embedded.stop(home)
                shutil.rmtree(home, ignore_errors=True)
