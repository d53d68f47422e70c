"""CLI flags generated from a config schema (:mod:`lresnet.core.schema`).

Every option of a config section becomes a typer option: its flag (and aliases), help text with
the allowed values and the default, and its help panel. Every generated option defaults to
``None``, meaning "not given", so a ``--config`` file's value survives unless a flag overrides
it. :func:`values_from_flags` turns the parsed flags back into the nested mapping that
:func:`lresnet.core.schema.build` takes; the schema then coerces and checks every value.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Iterable, Optional

import typer
from rich.markup import escape

from lresnet.core.errors import InputError
from lresnet.core.schema import Option, walk

_MAX_LISTED_CHOICES = 10

# The model options of the commands that run a backbone (verify, embed, export), declared once.
CHECKPOINT = typer.Option(None, "--checkpoint", help="Training checkpoint (.pt).")
WEIGHTS = typer.Option(None, "--weights", help="Backbone state dict: lresnet, arcface_torch or TreB1eN weights.")
NET = typer.Option(None, "--net", help="Backbone name, when the file does not say.")
BATCH_SIZE = typer.Option(64, "--batch-size", min=1, help="Images per forward.")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda[:i] or npu[:i].")
AMP = typer.Option("none", "--amp", help="Autocast dtype for the forward: none, bf16, fp16.")
BGR = typer.Option(None, "--bgr/--rgb", help="Channel order fed to the backbone (default: the one the weights "
                                             "expect; RGB).")


def param_name(opt: Option) -> str:
    """The Python parameter name of an option (``optim__lr``)."""
    return "__".join(opt.path)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def help_text(opt: Option) -> str:
    """The option's help, then its allowed values (when few) and its default."""
    text = escape(opt.spec.help)  # help is plain text: "[dali]" is not rich markup
    allowed = opt.spec.allowed()
    if allowed is not None and len(allowed) <= _MAX_LISTED_CHOICES:
        text += f" One of: {', '.join(map(str, allowed))}."
    default = opt.default
    if default not in (None, "", {}, ()):
        text += f" (default: {_show(default)})"
    return text


def _annotation(opt: Option) -> Any:
    tp = opt.base_type
    origin = getattr(tp, "__origin__", None)
    if origin is dict or (origin is tuple and opt.spec.repeat):
        return Optional[list[str]]
    if origin is tuple:
        return Optional[str]
    return Optional[tp]


def _decls(opt: Option) -> list[str]:
    names = [opt.flag, *opt.spec.aliases]
    if opt.base_type is bool:
        negative = opt.spec.negative or "--no-" + opt.flag[2:]
        return [f"{names[0]}/{negative}", *names[1:]]
    return names


def schema_parameters(section: type) -> list[inspect.Parameter]:
    """One keyword parameter (a typer option defaulting to None) per option of `section`.

    Raises:
        ValueError: two options would have the same flag (a bug in the schema).
    """
    options = list(walk(section))
    # panels in the order the sections declare them; a top-level option joins its panel there
    panels = list(dict.fromkeys(o.panel for o in options if len(o.path) > 1))
    options.sort(key=lambda o: panels.index(o.panel) if o.panel in panels else len(panels))
    params, seen = [], {}
    for opt in options:
        for name in [opt.flag, *opt.spec.aliases]:
            if name in seen:
                raise ValueError(f"flag {name} is declared by {seen[name]} and {opt.key}")
            seen[name] = opt.key
        info = typer.Option(None, *_decls(opt), help=help_text(opt), rich_help_panel=opt.panel or None,
                            metavar=opt.spec.metavar, show_default=False)
        params.append(inspect.Parameter(param_name(opt), inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=_annotation(opt)))
    return params


def parse_pairs(items: Iterable[str], flag: str) -> dict[str, Any]:
    """``["widths=[8,16,32,64]", "unit_style=paper"]`` -> a dict (values read as JSON, else kept as text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(flag, f"got {item!r}, expected NAME=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def values_from_flags(section: type, flags: dict[str, Any]) -> dict[str, Any]:
    """The nested values the user gave (``{"optim": {"lr": 0.2}}``); options not given are left out."""
    values: dict[str, Any] = {}
    for opt in walk(section):
        value = flags.get(param_name(opt))
        if value is None or (isinstance(value, list) and not value):
            continue
        if getattr(opt.base_type, "__origin__", None) is dict:
            value = parse_pairs(value, opt.flag)
        node = values
        for part in opt.path[:-1]:
            node = node.setdefault(part, {})
        node[opt.path[-1]] = value
    return values
