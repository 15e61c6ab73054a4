"""``python -m edgecc`` runs the CLI."""

import sys

from edgecc.cli import main

sys.exit(main())
