"""CLI commands in modules of their own, each registered in :mod:`edgecc.cli` with one line."""
