"""CLI subcommands, one module each (see streamkv.cli)."""
