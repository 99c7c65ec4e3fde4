"""The `dcmstatus` command line."""

from dcmstatus.cli.commands import main

__all__ = ["main"]
