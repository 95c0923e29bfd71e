"""``python -m benchmarks``: the same run as ``stalk bench`` (same options)."""

from __future__ import annotations

from stalk.bench import main

raise SystemExit(main())
