"""``python -m stalk.bench``: the same run as ``stalk bench`` (and the workers' entry point)."""

from __future__ import annotations

from stalk.bench import main

raise SystemExit(main())
