"""``python -m stalk.cli``: the ``stalk`` command."""

from stalk.cli import main

raise SystemExit(main())
