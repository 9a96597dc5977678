"""The `segkit` command line: thin Typer commands that parse, call the library and print."""

from cli.app import app, console, main

__all__ = ["app", "console", "main"]
