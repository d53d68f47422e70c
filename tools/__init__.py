"""The ``lresnet`` command line (``lresnet.tools.cli``), entered through :func:`main`.

This module imports nothing at load time, so an interrupt that arrives while the CLI is still
importing its commands is reported like any other: ``lresnet: interrupted``, exit code 130.
"""

import sys


def main() -> None:
    """Console-script entry point."""
    try:
        from lresnet.tools.cli import run
    except KeyboardInterrupt:
        sys.stderr.write("lresnet: interrupted\n")
        sys.exit(130)
    run()
