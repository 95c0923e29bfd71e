"""``python -m stalk``: the same as the ``stalk`` command."""

from stalk.cli import main

raise SystemExit(main())
