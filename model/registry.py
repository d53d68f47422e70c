"""Backbones by name: ``create_backbone("ir100e")``.

Each model family registers one tiny builder function per variant with
:func:`register_backbone`; the function's name is the backbone's name.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Optional, Sequence

from torch import nn

from lresnet.core.errors import InputError

Builder = Callable[..., nn.Module]

_BACKBONES: dict[str, Builder] = {}


def register_backbone(fn: Builder) -> Builder:
    """Decorator: register ``fn`` under its ``__name__``; a name may be registered once."""
    name = fn.__name__
    if name in _BACKBONES and _BACKBONES[name] is not fn:
        raise ValueError(f"backbone {name!r} is already registered by {_BACKBONES[name].__module__}")
    _BACKBONES[name] = fn
    return fn


def _load_families() -> None:
    # The families register themselves on import; importing them here makes the
    # registry complete even when only this module was imported.
    from lresnet.model import iresnet, mobilefacenet  # noqa: F401


def list_backbones(pattern: Optional[str] = None) -> list[str]:
    """Sorted names of the registered backbones, optionally filtered by a glob (``"irse*"``)."""
    _load_families()
    names = sorted(_BACKBONES, key=_natural_key)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: one of :func:`list_backbones` (``ir18`` ... ``ir200``, ``irse18`` ... ``irse200``,
            ``ir100e``, ``mobilefacenet``).
        **kwargs: passed to the family's constructor, e.g. ``embedding_size=512``, ``dropout=0.0``,
            ``unit_style="paper" | "treb1en"`` (IR families).

    Returns:
        an ``nn.Module`` mapping float NCHW ``[B, 3, 112, 112]`` to ``[B, embedding_size]``
        (not L2-normalised); it has an ``embedding_size`` attribute.

    Raises:
        InputError: the name is not registered (the message lists the known names), or an option
            the family does not take or whose value it refuses.
    """
    _load_families()
    try:
        builder = _BACKBONES[name]
    except KeyError:
        known = list_backbones()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(None, f"unknown backbone {name!r}{hint}; known backbones: {', '.join(known)}") from None
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as err:  # an option the family lacks, or a value its constructor refuses
        raise InputError(name, f"bad backbone option: {err}") from None


def check_sizes(name: str, values: Sequence[int]) -> None:
    """Raise ValueError unless `values` is a sequence of positive integers (channel and unit counts)."""
    if isinstance(values, (str, bytes)) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                   for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")


def _natural_key(name: str) -> tuple:
    # "ir18" < "ir34" < "ir100" < "ir100e" rather than the plain string order.
    match = re.fullmatch(r"(\D*?)(\d+)(.*)", name)
    if match is None:
        return (name, -1, "")
    return (match.group(1), int(match.group(2)), match.group(3))
