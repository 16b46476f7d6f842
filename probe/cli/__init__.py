"""The `probe` command line (typer commands in commands.py) and its progress display."""

from probe.cli.commands import app, main

__all__ = ["app", "main"]
