"""Entry point of the ``xatm`` command."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="xatm")
def main() -> None:
    """xatm: inspect and resolve in-doubt global transactions."""


if __name__ == "__main__":
    main()
