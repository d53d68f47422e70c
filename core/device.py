"""Devices and precision, resolved in one place for every command.

``resolve_device("cuda:1")`` -> ``torch.device``; ``torch_npu`` (Ascend) is imported only
when an ``npu`` device is asked for, and a missing package or device is an
:class:`~lresnet.core.errors.InputError`, not a traceback. ``autocast_dtype("bf16")`` maps
the AMP names used by every option to torch dtypes. torch is imported inside the
functions, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from lresnet.core.errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_KINDS = ("cpu", "cuda", "npu")
AMP_DTYPES = ("bf16", "fp16")
_AMP_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}
_NO_AMP = ("none", "fp32", "float32", "off")

DeviceLike = Union[str, "torch.device"]


def device_kind(spec: DeviceLike) -> str:
    """``"cuda:1"`` -> ``"cuda"``; the part before the index."""
    return str(spec).split(":", 1)[0]


def _import_npu(option: str) -> None:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device and torch.npu with torch)
    except ImportError:
        raise InputError(option, "got 'npu', but torch_npu is not installed (pip install 'lresnet[npu]')") from None


def resolve_device(spec: DeviceLike, device_id: int = -1, local_rank: int = 0,
                   option: str = "--device") -> "torch.device":
    """The torch device for ``cpu``, ``cuda[:i]`` or ``npu[:i]``, checked to exist here.

    Args:
        spec: a device string or ``torch.device``.
        device_id: the index when `spec` has none (``-1``: `local_rank`, as under torchrun).
        local_rank: this process's LOCAL_RANK.
        option: the option name errors name.
    Raises:
        InputError: an unknown device, a missing torch_npu, no such device on this machine.
    """
    import torch

    text = str(spec)
    kind, _, index_text = text.partition(":")
    if kind not in DEVICE_KINDS:
        raise InputError(option, f"got {text!r}, expected one of cpu, cuda[:i], npu[:i]")
    if kind == "cpu":
        return torch.device("cpu")
    if index_text:
        if not index_text.isdigit():
            raise InputError(option, f"got {text!r}, expected a device index after ':'")
        index = int(index_text)
    else:
        index = local_rank if device_id < 0 else device_id
    if kind == "npu":
        _import_npu(option)
    backend = getattr(torch, kind)
    if not backend.is_available():
        raise InputError(option, f"got {text!r}, but torch sees no {kind.upper()} device here")
    count = backend.device_count()
    if index >= count:
        raise InputError(option, f"device index {index} is out of range: {count} {kind.upper()} device(s) here")
    return torch.device(kind, index)


def bind_device(device: "torch.device") -> None:
    """Make `device` the current device of its kind (what NCCL/HCCL and bare ``.cuda()`` calls use)."""
    import torch

    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).set_device(device)


def synchronize(device: "torch.device") -> None:
    """Wait for the work queued on `device` (no-op on the CPU)."""
    import torch

    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize(device)


def autocast_dtype(amp: Union[None, str, "torch.dtype"], option: str = "--amp") -> Optional["torch.dtype"]:
    """``None``/``"none"``/``"fp32"`` -> None (no autocast); ``"bf16"``/``"fp16"`` (or the dtypes) -> the dtype.

    Raises:
        InputError: any other value.
    """
    import torch

    if amp is None:
        return None
    if isinstance(amp, torch.dtype):
        if amp == torch.float32:
            return None
        if amp in (torch.bfloat16, torch.float16):
            return amp
        raise InputError(option, f"got {amp}, expected bf16, fp16 or none")
    name = str(amp).lower()
    if name in _NO_AMP:
        return None
    if name in _AMP_ALIASES:
        return torch.bfloat16 if _AMP_ALIASES[name] == "bf16" else torch.float16
    raise InputError(option, f"got {amp!r}, expected one of bf16, fp16, none")
