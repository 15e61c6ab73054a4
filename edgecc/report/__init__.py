"""Metrics, numerical comparison and summaries shared by the dumps, reports and CLI."""
