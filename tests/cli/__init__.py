"""The ``xatm`` command: its subcommands, doctor, inspection, the saga commands."""
