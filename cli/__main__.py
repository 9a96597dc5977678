"""`python -m cli ...` (what `torchrun -m cli train ...` runs)."""

from cli.app import console

console()
