"""The ``lresnet`` command line.

Each area keeps its commands in its own ``tools/cmd_*.py`` module exposing
``register(app, bench)``; this file only assembles them, configures logging once
and turns :class:`InputError` into a one-line message with exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from lresnet.core.errors import InputError

app = typer.Typer(
    name="lresnet",
    help="Face-recognition training toolkit: IR backbones + ArcFace on faces_emore.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench = typer.Typer(help="Measure throughput against a baseline run in the same process.",
                    no_args_is_help=True)
app.add_typer(bench, name="bench")

# One module per area; each adds its commands to `app` and its benchmarks to `bench`.
COMMAND_MODULES = (
    "lresnet.tools.cmd_synth",
    "lresnet.tools.cmd_convert",
    "lresnet.tools.cmd_pipeline",
    "lresnet.tools.cmd_model",
    "lresnet.tools.cmd_verify",
    "lresnet.tools.cmd_train",
    "lresnet.tools.cmd_export",
    "lresnet.tools.cmd_embed",
    "lresnet.tools.cmd_ijb",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app, bench)


def setup_logging(verbose: bool = False) -> None:
    """Configure logging once; only rank 0 (per torchrun's RANK) logs below WARNING."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s" if rank else
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main() -> None:
    """Console-script entry point."""
    setup_logging(verbose=bool(os.environ.get("LRESNET_DEBUG")))
    try:
        app()
    except InputError as err:
        print(f"lresnet: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lresnet: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
