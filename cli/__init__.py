"""The `segkit` command line: thin Typer commands that parse, call the library and print."""

from cli.app import app, main

__all__ = ["app", "main"]
