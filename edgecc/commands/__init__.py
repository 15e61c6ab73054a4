"""CLI commands that live in their own module, each registered in :mod:`edgecc.cli` by one line."""
