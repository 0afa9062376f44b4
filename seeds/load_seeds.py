"""Load the seed files in this folder: ``python seeds/load_seeds.py [PATH]``.

The same as ``tenantdb seed [PATH]``; kept here so the seeds and their loader sit together.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tenantdb.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or [str(Path(__file__).resolve().parent)]
    sys.exit(main(["seed", *args]))
