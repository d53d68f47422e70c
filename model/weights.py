"""Load existing IR / IR-SE weights into lresnet backbones.

Sources (detected from the key names, or named explicitly):

- ``arcface_torch``: InsightFace's PyTorch ``iresnet*`` (``conv1, bn1, prelu,
  layer{1-4}.i.{bn1,conv1,bn2,prelu,conv2,bn3}, layer{k}.0.downsample.{0,1}, bn2, fc, features``).
  Paper-style units; expects RGB input; returns raw embeddings.
- ``treb1en``: TreB1eN InsightFace_Pytorch ``Backbone`` (``input_layer.{0,1,2},
  body.N.res_layer.{0..5}, body.N.shortcut_layer.{0,1}, output_layer.{0,3,4}``) and its ports.
  TreB1eN-style units; expects BGR input; its forward L2-normalises the embedding.
- ``lresnet``: this project's own key names (IR / IR-SE, and MobileFaceNet in the registered
  layout: ``stem.*, blocks.N.*, conv_head.*, gdc.*, fc, features``).

The backbone must have the source's unit style (``create_backbone("ir50")`` for arcface_torch
``iresnet50``, ``create_backbone("irse50")`` or ``create_backbone("ir50", unit_style="treb1en")``
for TreB1eN); :func:`describe_state_dict` tells which one a state dict needs.

Files are read in one place (:func:`read_torch_file`: ``torch.load(weights_only=True)``, so no
pickled code runs), and wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``) are stripped by one rule. :func:`load_weights_backbone` and
:func:`load_checkpoint_backbone` build a ready backbone from a weights file or a training
checkpoint (what ``lresnet verify`` scores).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from lresnet.core.errors import InputError
from lresnet.model.iresnet import IResNet
from lresnet.model.registry import create_backbone

SOURCES = ("arcface_torch", "treb1en", "lresnet")
_CHANNEL_ORDER = {"arcface_torch": "RGB", "treb1en": "BGR", "lresnet": "RGB"}
_L2_NORMALIZED = {"arcface_torch": False, "treb1en": True, "lresnet": False}
_UNIT_STYLE = {"arcface_torch": "paper", "treb1en": "treb1en"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# what torch.load raises for a damaged, truncated, foreign or code-carrying file under weights_only=True
_TORCH_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError)
_MAX_LISTED = 8

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class WeightInfo:
    """What a caller must know to use imported weights.

    Attributes:
        source: ``"arcface_torch"``, ``"treb1en"`` or ``"lresnet"``.
        channel_order: ``"RGB"`` or ``"BGR"``: the input channel order the weights were trained on.
        l2_normalized: the source model L2-normalises its output (lresnet backbones never do;
            normalise the embedding to reproduce the source's output).
    """

    source: str
    channel_order: str
    l2_normalized: bool


@dataclass(frozen=True)
class StateDictSpec:
    """The architecture a state dict describes (:func:`describe_state_dict`)."""

    source: str
    units: tuple[int, ...]
    se: bool
    embedding_size: int
    unit_style: Optional[str]
    family: str = "iresnet"  # or "mobilefacenet" (units () and unit_style None then)

    @property
    def backbone_name(self) -> Optional[str]:
        """The registered name of this depth (``"irse50"``), or None for a non-standard depth."""
        from lresnet.model.iresnet import UNITS

        if self.family == "mobilefacenet":
            return "mobilefacenet"
        depth = next((d for d, u in UNITS.items() if u == self.units), None)
        return f"{'irse' if self.se else 'ir'}{depth}" if depth else None

    @property
    def channel_order(self) -> str:
        """Input channel order the source was trained on."""
        return _CHANNEL_ORDER[self.source]

    @property
    def l2_normalized(self) -> bool:
        """Whether the source model L2-normalises its output."""
        return _L2_NORMALIZED[self.source]

    def backbone_hint(self) -> str:
        """The ``create_backbone`` call that fits, e.g. ``create_backbone('irse50', unit_style='treb1en', ...)``."""
        name = self.backbone_name
        if self.family == "mobilefacenet":
            return f"create_backbone('mobilefacenet', embedding_size={self.embedding_size})"
        if name is None:
            return f"IResNet(units={self.units}, se={self.se}, unit_style={self.unit_style!r})"
        return f"create_backbone({name!r}, unit_style={self.unit_style!r}, embedding_size={self.embedding_size})"


def detect_source(state_dict: StateDict) -> str:
    """``"arcface_torch"``, ``"treb1en"`` or ``"lresnet"`` from the key names.

    Raises:
        InputError: the keys match none of them.
    """
    keys = set(strip_wrappers(state_dict))
    if "input_layer.0.weight" in keys or any(k.startswith("body.") for k in keys):
        return "treb1en"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "arcface_torch"
    if "stem.conv.weight" in keys and any(k.startswith("stages.") for k in keys):
        return "lresnet"
    if "gdc.0.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "lresnet"  # MobileFaceNet
    sample = ", ".join(sorted(keys)[:5]) or "no keys"
    raise InputError(None, f"cannot tell the source of this state dict (first keys: {sample}); "
                           f"expected one of {', '.join(SOURCES)}")


def describe_state_dict(state_dict: StateDict, source: str = "auto") -> StateDictSpec:
    """Depth (units per stage), SE, embedding size and unit style of an IR state dict.

    Raises:
        InputError: unknown source, a state dict without the keys that tell its shape, or a
            MobileFaceNet whose layers differ from the registered ``mobilefacenet``'s.
    """
    sd = strip_wrappers(state_dict)
    source = detect_source(sd) if source == "auto" else _check_source(source)
    try:
        return _describe(sd, source)
    except KeyError as err:
        raise InputError(None, f"incomplete {source} state dict: no {err.args[0]!r}") from None
    except IndexError:  # a tensor without the dimension that holds a size
        raise InputError(None, f"malformed {source} state dict: a tensor has fewer dimensions than its "
                               "layer needs") from None


def _describe(sd: StateDict, source: str) -> StateDictSpec:
    if source == "lresnet" and "gdc.0.weight" in sd:
        return _describe_mobilefacenet(sd)
    if source == "treb1en":
        out_channels = [sd[f"body.{n}.res_layer.1.weight"].shape[0] for n in _indices(sd, r"body\.(\d+)\.")]
        units = _run_lengths(out_channels)
        se = any(".res_layer.5." in k for k in sd)
        embedding_size = sd["output_layer.3.weight"].shape[0]
        style = "treb1en"
    elif source == "arcface_torch":
        units = tuple(len(_indices(sd, rf"layer{k}\.(\d+)\.")) for k in range(1, 5))
        se = False
        embedding_size = sd["fc.weight"].shape[0]
        style = "paper"
    else:
        units = tuple(len(_indices(sd, rf"stages\.{k}\.(\d+)\.")) for k in range(4))
        se = any(".se." in k for k in sd)
        embedding_size = sd["head.fc.weight"].shape[0]
        style = "paper" if any(re.search(r"stages\.\d+\.\d+\.bn2\.weight$", k) for k in sd) else "treb1en"
    return StateDictSpec(source, tuple(units), se, int(embedding_size), style)


def _describe_mobilefacenet(sd: StateDict) -> StateDictSpec:
    """The registered MobileFaceNet with this embedding size, if every key and shape matches it.

    Strides leave no trace in a state dict, so only the registered layout can be told apart.
    """
    embedding_size = int(sd["fc.weight"].shape[0])
    with torch.device("meta"):
        reference = create_backbone("mobilefacenet", embedding_size=embedding_size).state_dict()
    keys = {k for k in sd if not k.endswith("num_batches_tracked")}
    expected = {k for k in reference if not k.endswith("num_batches_tracked")}
    differ = sorted(keys ^ expected) or [k for k in sorted(keys) if sd[k].shape != reference[k].shape]
    if differ:
        raise InputError(None, f"a MobileFaceNet state dict whose layers differ from the registered "
                               f"mobilefacenet's (first: {differ[0]}); build the same MobileFaceNet and "
                               "use load_state_dict")
    return StateDictSpec("lresnet", (), False, embedding_size, None, family="mobilefacenet")


def load_weights(backbone: nn.Module, state_dict_or_path: Union[StateDict, str, "os.PathLike[str]"],
                 source: str = "auto") -> WeightInfo:
    """Copy an arcface_torch / TreB1eN / lresnet state dict into an lresnet IR backbone, in place.

    Args:
        backbone: an :class:`IResNet` of the source's depth, SE setting and unit style.
        state_dict_or_path: a state dict, or a file saved with ``torch.save`` (loaded with
            ``weights_only=True``; a ``{"state_dict": ...}`` wrapper and ``module.`` prefixes are fine).
        source: ``"auto"`` (from the keys) or one of ``arcface_torch``, ``treb1en``, ``lresnet``.

    Returns:
        :class:`WeightInfo` (source, input channel order, whether the source L2-normalises).
        It is also stored as ``backbone.weight_info``.

    Raises:
        InputError: unreadable file, unknown source, or keys/shapes that do not fit the backbone
            (the message lists them and names the backbone that would fit).
    """
    state_dict, where = _resolve(state_dict_or_path)
    if not isinstance(backbone, IResNet):
        raise InputError(where, f"weights can be loaded into IR/IR-SE backbones only, got {type(backbone).__name__}")
    sd = strip_wrappers(state_dict)
    try:
        source = detect_source(sd) if source == "auto" else _check_source(source)
    except InputError as err:
        raise InputError(where, err.message) from None

    expected_style = _UNIT_STYLE.get(source, backbone.unit_style)
    if backbone.unit_style != expected_style:
        raise InputError(where, f"{source} weights need unit_style={expected_style!r}, the backbone has "
                                f"{backbone.unit_style!r}; build it with {_hint(sd, source)}")

    mapped, origin, unmapped = _translate(sd, source, backbone)
    target = backbone.state_dict()
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = unmapped + [f"{origin[dst]} (as {dst})" for dst in mapped if dst not in target]
    shapes = [f"{origin[dst]} {tuple(mapped[dst].shape)} vs {dst} {tuple(target[dst].shape)}"
              for dst in mapped if dst in target and mapped[dst].shape != target[dst].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:_MAX_LISTED]) + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")
                parts.append(f"{label}: {shown}")
        raise InputError(where, f"{source} weights do not fit {_backbone_name(backbone)}: " + "; ".join(parts)
                         + f"; the weights fit {_hint(sd, source)}")
    # num_batches_tracked may be absent from old checkpoints; the backbone keeps its own.
    backbone.load_state_dict({k: v for k, v in mapped.items() if k in target}, strict=False)
    info = WeightInfo(source, _CHANNEL_ORDER[source], _L2_NORMALIZED[source])
    backbone.weight_info = info
    return info


def backbone_from_weights(state_dict_or_path: Union[StateDict, str, "os.PathLike[str]"],
                          source: str = "auto", **kwargs) -> tuple[IResNet, WeightInfo]:
    """Build the IR backbone a state dict describes and load it.

    Args:
        state_dict_or_path: as for :func:`load_weights`.
        source: ``"auto"`` or one of ``arcface_torch``, ``treb1en``, ``lresnet``.
        **kwargs: further backbone options (e.g. ``dropout``).

    Returns:
        ``(backbone, WeightInfo)``; the backbone is in training mode, as built. A MobileFaceNet
        state dict (the registered layout) gives a :class:`MobileFaceNet`.
    """
    state_dict, where = _resolve(state_dict_or_path)
    sd = strip_wrappers(state_dict)
    try:
        spec = describe_state_dict(sd, source)
    except InputError as err:
        raise InputError(where, err.message) from None
    if spec.family == "mobilefacenet":
        backbone = create_backbone("mobilefacenet", embedding_size=spec.embedding_size, **kwargs)
        _load_strict(backbone, sd, where, "mobilefacenet")
        info = WeightInfo(spec.source, spec.channel_order, spec.l2_normalized)
        backbone.weight_info = info
        return backbone, info
    backbone = IResNet(spec.units, embedding_size=spec.embedding_size, unit_style=spec.unit_style,
                       se=spec.se, **kwargs)
    info = load_weights(backbone, sd, spec.source)
    return backbone, info


@dataclass
class LoadedBackbone:
    """A backbone built and loaded from a file, and what a report says about it.

    Attributes:
        backbone: the module (training mode, as built).
        net: its registered name.
        bgr: the weights expect BGR input (TreB1eN).
        description: ``{"kind": "checkpoint" | "weights", "path", "net", ...}`` for reports.
        l2_normalized: the source network L2-normalised its output (TreB1eN): its evaluation
            protocol sums normalised embeddings.
    """

    backbone: nn.Module
    net: str
    bgr: bool
    description: dict[str, Any] = field(default_factory=dict)
    l2_normalized: bool = False


def load_checkpoint_backbone(path: Union[str, "os.PathLike[str]"], net: Optional[str] = None) -> LoadedBackbone:
    """The backbone of a training checkpoint (``{"backbone": state dict, "config": {"model": ...}}``).

    Args:
        path: the checkpoint file (read with ``weights_only=True``).
        net: the backbone name, when the checkpoint's ``config["model"]["net"]`` is missing or
            should be overridden; ``embedding_size`` and ``options`` still come from the config.

    Raises:
        InputError: unreadable file, not a checkpoint, no backbone name, or weights that do not fit.
    """
    where = os.fspath(path)
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("backbone"), dict):
        raise InputError(where, "not a training checkpoint (expected a dict with a 'backbone' state dict; "
                                "use --weights for a bare state dict)")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    name = net or model_cfg.get("net")
    if not name:
        raise InputError(where, "the checkpoint does not name its backbone (config.model.net); pass --net")
    kwargs: dict[str, Any] = {}
    if "embedding_size" in model_cfg:
        kwargs["embedding_size"] = int(model_cfg["embedding_size"])
    if isinstance(model_cfg.get("options"), dict):
        kwargs.update(model_cfg["options"])
    backbone = _build(name, where, **kwargs)
    _load_strict(backbone, strip_wrappers(ckpt["backbone"]), where, name)
    step = ckpt.get("step")
    return LoadedBackbone(backbone, name, False, {"kind": "checkpoint", "path": where, "net": name,
                                                  "step": int(step) if isinstance(step, int) else None})


def load_weights_backbone(path: Union[str, "os.PathLike[str]"], net: Optional[str] = None) -> LoadedBackbone:
    """A backbone loaded from a bare state dict: arcface_torch, TreB1eN or lresnet weights.

    The architecture is read from the key names and shapes (:func:`describe_state_dict`);
    ``net`` names the backbone when they do not tell it, or overrides the name they give.

    Raises:
        InputError: unreadable file, an architecture neither the keys nor ``net`` tell, or
            weights that do not fit the backbone.
    """
    where = os.fspath(path)
    state_dict = read_state_dict(path)
    try:
        spec: Optional[StateDictSpec] = describe_state_dict(state_dict)
    except InputError:
        spec = None  # names that say nothing of the architecture: only --net can
    if spec is None:
        if not net:
            raise InputError(where, "cannot tell the backbone from the weight names; pass --net")
        backbone = _build(net, where)
        _load_strict(backbone, state_dict, where, net)
        return LoadedBackbone(backbone, net, False, {"kind": "weights", "path": where, "net": net,
                                                     "source": "lresnet"})
    name = net or spec.backbone_name
    if name is None:
        raise InputError(where, f"no registered depth has units {spec.units}; pass --net")
    if spec.family == "mobilefacenet":
        backbone = _build(name, where, embedding_size=spec.embedding_size)
        _load_strict(backbone, state_dict, where, name)
        info = WeightInfo(spec.source, spec.channel_order, spec.l2_normalized)
    else:
        backbone = _build(name, where, embedding_size=spec.embedding_size, unit_style=spec.unit_style)
        try:
            info = load_weights(backbone, state_dict)
        except InputError as err:
            raise InputError(where, err.message) from None
    return LoadedBackbone(backbone, name, info.channel_order == "BGR",
                          {"kind": "weights", "path": where, "net": name, "source": info.source,
                           "channel_order": info.channel_order, "l2_normalized": info.l2_normalized},
                          info.l2_normalized)


def load_backbone(checkpoint: Optional[Union[str, "os.PathLike[str]"]] = None,
                  weights: Optional[Union[str, "os.PathLike[str]"]] = None, net: Optional[str] = None) -> LoadedBackbone:
    """The backbone of a training ``checkpoint`` or of a ``weights`` file: exactly one of the two.

    Raises:
        InputError: neither or both given, or what the two loaders raise.
    """
    if (checkpoint is None) == (weights is None):
        raise InputError("--checkpoint", "give exactly one of --checkpoint or --weights")
    return load_checkpoint_backbone(checkpoint, net) if checkpoint is not None else load_weights_backbone(weights, net)


def _build(name: str, where: str, **kwargs) -> nn.Module:
    """``create_backbone(name, **kwargs)``; options the family lacks are bad input naming ``where``."""
    try:
        return create_backbone(name, **kwargs)
    except TypeError as err:  # e.g. unit_style for MobileFaceNet
        raise InputError(where, f"backbone {name!r} cannot be built with {kwargs}: {err}") from None


def _load_strict(backbone: nn.Module, state_dict: StateDict, where: str, net: str) -> None:
    """``load_state_dict`` with every key and shape required; a mismatch is bad input naming ``where``."""
    try:
        backbone.load_state_dict(strip_wrappers(state_dict))
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise InputError(where, f"weights do not fit backbone {net!r}: {detail}") from None


def read_torch_file(path: Union[str, "os.PathLike[str]"], what: str = "weights") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: the one reader of weight files.

    Args:
        what: what the file should hold, for the error message (``"weights"``, ``"checkpoint"``).

    Raises:
        InputError: no such file, or a file ``weights_only`` loading refuses or cannot parse.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise InputError(where, "no such file")
    try:
        with warnings.catch_warnings():  # e.g. a note on the pickle protocol: not the user's concern
            warnings.simplefilter("ignore")
            return torch.load(where, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as err:
        # torch's unpickler wraps the reason in advice (weights_only=False, which would run code): keep the reason
        text = str(err).split("WeightsUnpickler error:", 1)[-1]
        reason = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:160]
        detail = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
        raise InputError(where, f"cannot read {what}: torch.load(weights_only=True) cannot load it "
                                f"({detail})") from None


def read_state_dict(path: Union[str, "os.PathLike[str]"]) -> dict[str, torch.Tensor]:
    """Load a state dict file (``weights_only=True``), unwrapping ``state_dict``/``model`` and ``module.``.

    Raises:
        InputError: missing or unreadable file, or no mapping of names to tensors in it.
    """
    return strip_wrappers(_read(os.fspath(path)))


def _resolve(state_dict_or_path) -> tuple[StateDict, str]:
    """``(state dict, name for error messages)`` from a state dict or a file path."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        return _read(path), path
    return state_dict_or_path, "state dict"


def _read(path: str) -> StateDict:
    obj = read_torch_file(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "backbone", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError(path, "not a state dict (expected a mapping of names to tensors, "
                           "or one under 'state_dict', 'backbone' or 'model')")


def strip_wrappers(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """The state dict without wrapper prefixes: ``module.`` (DDP) and ``_orig_mod.`` (torch.compile),
    in any order and nesting, are removed from the start of every key."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise InputError(None, f"unknown weight source {source!r}; expected auto or one of {', '.join(SOURCES)}")
    return source


def _indices(sd: StateDict, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return sorted(found)


def _run_lengths(values: list[int]) -> tuple[int, ...]:
    runs: list[int] = []
    previous = None
    for v in values:
        if v == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = v
    return tuple(runs)


def _hint(sd: StateDict, source: str) -> str:
    try:
        return describe_state_dict(sd, source).backbone_hint()
    except InputError:
        return "a backbone of the same architecture"


def _backbone_name(backbone: IResNet) -> str:
    return f"{'IR-SE' if backbone.se else 'IR'}-{backbone.depth} (units {backbone.units}, unit_style={backbone.unit_style!r})"


# --- key translation -------------------------------------------------------------------------

_ARCFACE_UNIT = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "prelu": "act", "conv2": "conv2", "bn3": "bn3",
                 "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
_ARCFACE_TOP = {"conv1": "stem.conv", "bn1": "stem.bn", "prelu": "stem.act", "bn2": "head.bn",
                "fc": "head.fc", "features": "head.features"}
_TREB1EN_RES = {"0": "bn1", "1": "conv1", "2": "act", "3": "conv2", "4": "bn3", "5.fc1": "se.fc1", "5.fc2": "se.fc2"}
_TREB1EN_TOP = {"input_layer.0": "stem.conv", "input_layer.1": "stem.bn", "input_layer.2": "stem.act",
                "output_layer.0": "head.bn", "output_layer.3": "head.fc", "output_layer.4": "head.features"}


def _target_key(key: str, source: str, unit_position: list[tuple[int, int]]) -> Optional[str]:
    """The lresnet name of one source key, or None when it has no counterpart."""
    module, _, leaf = key.rpartition(".")
    if source == "lresnet":
        return key
    if source == "arcface_torch":
        m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", module)
        if m:
            part = _ARCFACE_UNIT.get(m.group(3))
            return f"stages.{int(m.group(1)) - 1}.{m.group(2)}.{part}.{leaf}" if part else None
        top = _ARCFACE_TOP.get(module)
        return f"{top}.{leaf}" if top else None
    m = re.fullmatch(r"body\.(\d+)\.(res_layer|shortcut_layer)\.(.+)", module)
    if m:
        n = int(m.group(1))
        if n >= len(unit_position):
            return None
        stage, index = unit_position[n]
        part = _TREB1EN_RES.get(m.group(3)) if m.group(2) == "res_layer" else f"shortcut.{m.group(3)}"
        return f"stages.{stage}.{index}.{part}.{leaf}" if part else None
    top = _TREB1EN_TOP.get(module)
    return f"{top}.{leaf}" if top else None


def _translate(sd: StateDict, source: str, backbone: IResNet
               ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(lresnet key -> tensor, lresnet key -> source key, source keys with no counterpart)."""
    positions = [(s, i) for s, count in enumerate(backbone.units) for i in range(count)]
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        dst = _target_key(key, source, positions)
        if dst is None:
            unmapped.append(key)
        else:
            mapped[dst] = value
            origin[dst] = key
    return mapped, origin, unmapped
