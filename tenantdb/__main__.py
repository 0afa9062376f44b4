"""``python -m tenantdb``: the same as the ``tenantdb`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
