"""``python -m levo_data`` == ``levo-data``."""

from levo_data.cli import main

raise SystemExit(main())
