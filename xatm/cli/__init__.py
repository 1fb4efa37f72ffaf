"""The ``xatm`` command line application (click), built on xatm's public API only."""
