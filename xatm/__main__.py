"""``python -m xatm``: the ``xatm`` command."""

from xatm.cli.main import main

if __name__ == "__main__":
    main()
