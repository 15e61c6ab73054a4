"""CLI commands that live in modules of their own, each registered in :mod:`edgecc.cli`."""
