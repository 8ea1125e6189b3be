"""Subcommands of `asearcher` (asearcher_jax/cli.py) grouped by what they act on. The top layer:
a command may import any package; no package imports a command."""
