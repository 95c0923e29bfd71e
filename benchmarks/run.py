"""``python benchmarks/run.py``: the same run as ``stalk bench``, from a source checkout.

The checkout's ``src/`` goes first on the path, so this benchmarks the working tree even
when another stalk is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from stalk.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
