"""The ``lresnet`` command line.

Each area keeps its commands in its own ``tools/cmd_*.py`` module exposing
``register(app, bench)``; this file only assembles them, configures logging once
and turns :class:`InputError` into a one-line message with exit code 2.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import traceback

import typer
from typer import Abort as ClickAbort

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import (BadParameter, ClickException, MissingParameter, NoArgsIsHelpError,
                                         NoSuchOption)
except ImportError:  # older typer runs on click itself
    from click.exceptions import BadParameter, ClickException, MissingParameter, NoArgsIsHelpError, NoSuchOption

from lresnet.core.errors import ENVIRONMENT_ERRNOS, InputError
from lresnet.core.interrupt import Interrupted, signals_raise_interrupted

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
    "lresnet.tools.cmd_device",
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


def usage_error_line(err: ClickException) -> str:
    """A command-line parsing error as the one line every lresnet error is:
    ``lresnet: error: --batch-size: 'abc' is not a valid integer (see lresnet train --help)``."""
    ctx = getattr(err, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    if isinstance(err, MissingParameter):
        message = " ".join(err.format_message().split()).rstrip(".")
        return f"lresnet: error: {ctx.command_path if ctx is not None else 'lresnet'}: {message}{hint}"
    if isinstance(err, NoSuchOption):
        close = difflib.get_close_matches(err.option_name, err.possibilities or [], n=1) if err.possibilities else []
        did_you_mean = f", did you mean {close[0]}?" if close else ""
        return f"lresnet: error: {err.option_name}: no such option{did_you_mean}{hint}"
    param = getattr(err, "param", None)
    if isinstance(err, BadParameter) and param is not None:
        where = "/".join(param.opts) if getattr(param, "opts", None) else param.name
        message = " ".join(str(err.message).split()).rstrip(".")
        return f"lresnet: error: {where}: {message}{hint}"
    message = " ".join(err.format_message().split()).rstrip(".")
    where = ctx.command_path if ctx is not None else "lresnet"
    return f"lresnet: error: {where}: {message}{hint}"


def _environment_fault(err: OSError) -> str | None:
    """The one-line message for an operating-system fault (disk full, no permission...), or None
    when the OSError is not one (then it is a bug and keeps its traceback)."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = err.filename if err.filename is not None else "(no file name)"
    return f"lresnet: error: {where}: {err.strerror or err}"


def run(argv: list[str] | None = None) -> None:
    """Run the CLI and exit: 0, 2 for bad input or a fault of the environment (one line on stderr),
    130/143 when interrupted, 1 for a bug (its traceback under a one-line header)."""
    setup_logging(verbose=bool(os.environ.get("LRESNET_DEBUG")))
    code = 1
    try:
        with signals_raise_interrupted():
            try:
                code = typer.main.get_command(app).main(args=argv, prog_name="lresnet", standalone_mode=False)
                if code == 130:  # typer turned a KeyboardInterrupt into exit code 130, silently
                    sys.stderr.write("lresnet: interrupted\n")
            except NoArgsIsHelpError as err:  # a bare command group: its help, as usage
                err.show()
                code = 2
            except ClickException as err:
                sys.stderr.write(usage_error_line(err) + "\n")
                code = 2 if err.exit_code == 1 else err.exit_code
            except ClickAbort:  # end of input at a prompt
                sys.stderr.write("lresnet: interrupted\n")
                code = 130
    except Interrupted as err:
        sys.stderr.write(f"lresnet: interrupted ({err})\n")
        code = err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("lresnet: interrupted\n")
        code = 130
    except InputError as err:
        sys.stderr.write(f"lresnet: error: {err}\n")
        code = 2
    except OSError as err:
        message = _environment_fault(err)
        if message is None:
            _report_bug()
        else:
            sys.stderr.write(message + "\n")
            code = 2
    except MemoryError:
        sys.stderr.write("lresnet: error: out of memory (a smaller --batch-size, fewer --workers, or a smaller "
                         "input may fit)\n")
        code = 2
    except Exception:
        _report_bug()
    sys.exit(code if isinstance(code, int) else 0)


def _report_bug() -> None:
    sys.stderr.write("lresnet: this is a bug in lresnet; please report it with the traceback below\n")
    traceback.print_exc()


def main() -> None:
    """Console-script entry point (see :func:`lresnet.tools.main`)."""
    run()


if __name__ == "__main__":
    main()
