"""``lresnet bench device``: the one prepared check of an accelerator, in a few minutes.

Accelerator time comes in short windows on a bare machine, so everything worth knowing is
measured in one run (``tools/device_check.sh`` installs the project offline first):

1. the accelerator-marked tests (``pytest -m cuda``);
2. ``bench model`` of IR-100 at each batch size: fp32 NCHW vs bf16 channels_last vs bf16
   channels_last + torch.compile, with model FLOPs utilisation;
3. ``bench train`` end to end from shards synthesized and converted here, for each network and
   decoder (CPU decode in N workers, ``nvjpeg`` on the GPU): images/s, data wait, peak memory.

Each unit runs as its own process under its own time budget (a process group killed when it
runs over), so one hang, crash or slow compilation costs only its unit and the check goes on;
budgets are also cut so that every later unit keeps a minimum before the overall deadline.
The report (JSON) is passed to a callback after every unit, so a check stopped from outside
still leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lresnet.core.device import device_kind
from lresnet.core.errors import InputError

FORMAT = "lresnet-device-check/1"
STAGES = ("tests", "model", "train")
MIN_UNIT_S = 30.0  # the most a later unit keeps back from an earlier one that could run long
TAIL_LINES = 20  # lines of a failed unit's output kept in the report

# the smallest networks with convs, BN and PReLU, for a --quick run on a CPU
QUICK_NET = ("mobilefacenet", {"bottlenecks": [[1, 8, 1, 2]], "stem_channels": 8, "head_channels": 16})

Say = Callable[[str], None]


@dataclass(frozen=True)
class CheckSettings:
    """What a device check runs; :func:`check_settings` gives the defaults for a device and ``--quick``."""

    device: str = "cuda"
    quick: bool = False
    stages: tuple[str, ...] = STAGES
    deadline_s: float = 450.0  # the whole check after installing (8 minutes with the install)
    # stage 1: tests
    test_marker: str = "cuda"
    tests_budget_s: float = 90.0
    # stage 2: bench model
    model_net: str = "ir100e"
    model_options: dict[str, Any] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (128, 256)
    model_steps: int = 10
    model_warmup: int = 2
    compile: bool = True
    matmul_size: int = 0
    threads: int = 0  # torch CPU threads of each bench process (0: torch's default)
    model_budget_s: float = 150.0
    # stage 3: bench train
    train_nets: tuple[str, ...] = ("ir100e", "mobilefacenet")
    train_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    decoders: tuple[str, ...] = ("simplejpeg", "nvjpeg")
    workers: int = 8
    train_batch_size: int = 128
    train_steps: int = 90
    log_every: int = 15
    identities: int = 750
    images_per_id: int = 16
    shard_size: int = 750
    train_budget_s: float = 60.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_settings(device: str = "cuda", quick: bool = False, **changes: Any) -> CheckSettings:
    """The defaults for `device` (a GPU: IR-100 and the paper MobileFaceNet at the sizes above; the CPU: no
    GPU decoder) and ``quick`` (tiny networks and data, few steps, no torch.compile: under a minute on
    2 CPU cores), with `changes` laid over them (None values are ignored).

    Raises:
        InputError: an unknown stage or device kind, or a count out of range.
    """
    kind = device_kind(device)
    base: dict[str, Any] = {"device": device, "quick": quick}
    if kind == "cpu":
        base.update(decoders=("simplejpeg",), workers=2)
    if kind == "npu":
        base.update(test_marker="npu", decoders=("simplejpeg",))
    if quick:
        net, options = QUICK_NET
        base.update(model_net=net, model_options=options, batch_sizes=(4,), model_steps=1, model_warmup=1,
                    compile=False, matmul_size=256, threads=1 if kind == "cpu" else 0,
                    train_nets=(net,), train_options={net: options}, workers=1,
                    train_batch_size=8, train_steps=6, log_every=2, identities=16, images_per_id=10, shard_size=40,
                    deadline_s=120.0, tests_budget_s=60.0, model_budget_s=45.0, train_budget_s=45.0)
    base.update({k: v for k, v in changes.items() if v is not None})
    settings = CheckSettings(**base)
    _validate(settings)
    return settings


def _validate(s: CheckSettings) -> None:
    if device_kind(s.device) not in ("cpu", "cuda", "npu"):
        raise InputError("--device", f"got {s.device!r}, expected one of cpu, cuda[:i], npu[:i]")
    unknown = [stage for stage in s.stages if stage not in STAGES]
    if unknown or not s.stages:
        raise InputError("--stage", f"got {','.join(s.stages)}, expected some of {','.join(STAGES)}")
    for flag, value, low in (("--workers", s.workers, 0), ("--deadline", s.deadline_s, 1),
                             ("train_steps", s.train_steps, 2 * s.log_every)):
        if value < low:
            raise InputError(flag, f"got {value}, expected >= {low}")
    if not s.batch_sizes or min(s.batch_sizes) < 1:
        raise InputError("--batch-size", f"got {list(s.batch_sizes)}, expected integers >= 1")


# ----------------------------------------------------------------------------- one unit of work

@dataclass
class Unit:
    """One process of the check: a command, what it is called in the report, its time budget.

    A ``json`` unit is a ``lresnet bench ... --json`` command (its stdout is the result); a
    ``pytest`` unit's result is the counts of pytest's closing line.
    """

    stage: str
    name: str
    command: list[str]
    budget_s: float
    kind: str = "json"


def _tail(text: str, lines: int = TAIL_LINES) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def run_unit(unit: Unit, allowed_s: float, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `unit` for at most `allowed_s` seconds; its record for the report.

    ``status``: ``ok``; ``refused`` (a lresnet command's exit 2: an input or setting this machine
    cannot run, e.g. a GPU decoder without a GPU); ``failed`` (another exit code, failing tests,
    or output that is not the command's JSON); ``timeout`` (killed with its whole process group).
    """
    record: dict[str, Any] = {"stage": unit.stage, "name": unit.name, "budget_s": round(allowed_s, 1),
                              "command": unit.command}
    start = time.perf_counter()
    proc = subprocess.Popen(unit.command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=allowed_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the unit and the loader workers it started
        out, err = proc.communicate()
        record.update(status="timeout", seconds=round(time.perf_counter() - start, 1),
                      error=f"still running after {allowed_s:.0f} s: killed", log_tail=_tail(out + "\n" + err))
        return record
    record.update(seconds=round(time.perf_counter() - start, 1), returncode=proc.returncode)
    if unit.kind == "pytest":
        counts = pytest_counts(out)
        ok = proc.returncode == 0 or (proc.returncode == 5 and not counts.get("failed"))  # 5: none selected
        record.update(status="ok" if ok else "failed", result=counts)
        if not ok:
            record.update(error=f"pytest exit code {proc.returncode}", log_tail=_tail(out + "\n" + err))
        return record
    if proc.returncode != 0:
        errors = [line for line in err.splitlines() if line.startswith("lresnet: error:")]
        record.update(status="refused" if proc.returncode == 2 else "failed",
                      error=errors[-1] if errors else f"exit code {proc.returncode}", log_tail=_tail(out + "\n" + err))
        return record
    try:
        record.update(status="ok", result=json.loads(out))
    except ValueError as bad:  # not the JSON document the command prints
        record.update(status="failed", error=f"unreadable output: {bad}", log_tail=_tail(out + "\n" + err))
    return record


def pytest_counts(output: str) -> dict[str, int]:
    """``{"passed": 3, "skipped": 5, ...}`` from pytest's closing line."""
    lines = [line for line in output.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|"
                                                    r"xpassed)", lines[-1])}


# ----------------------------------------------------------------------------- the plan

def _net_flags(options: dict[str, Any]) -> list[str]:
    return [flag for key, value in options.items() for flag in ("--net-option", f"{key}={json.dumps(value)}")]


def plan_units(s: CheckSettings, work: Path, shards: Optional[Path], tests_dir: Optional[Path],
               python: str = sys.executable) -> list[Unit]:
    """The processes of the chosen stages, in order (train units need `shards`)."""
    cli = [python, "-m", "lresnet.tools", "bench"]
    units = []
    if "tests" in s.stages and tests_dir is not None:
        units.append(Unit("tests", f"pytest -m {s.test_marker}",
                          [python, "-m", "pytest", "-m", s.test_marker, "-rfE", "-p", "no:cacheprovider",
                           str(tests_dir)], s.tests_budget_s, kind="pytest"))
    if "model" in s.stages:
        for batch in s.batch_sizes:
            command = cli + ["model", s.model_net, "--batch-size", str(batch), "--dtype", "bf16", "--channels-last",
                             "--steps", str(s.model_steps), "--warmup", str(s.model_warmup), "--device", s.device,
                             "--matmul-size", str(s.matmul_size), "--threads", str(s.threads), "--json"]
            command += _net_flags(s.model_options)
            units.append(Unit("model", f"{s.model_net} batch {batch}", command + (["--compile"] if s.compile else []),
                              s.model_budget_s))
    if "train" in s.stages and shards is not None:
        for net in s.train_nets:
            for i, decoder in enumerate(s.decoders):
                sources = ["--source", "shards"] + (["--source", "memory"] if i == 0 else [])
                command = cli + ["train", "--shards", str(shards), "--net", net, "--batch-size",
                                 str(s.train_batch_size), "--steps", str(s.train_steps), "--log-every",
                                 str(s.log_every), "--workers", str(s.workers), "--decoder", decoder,
                                 "--device", s.device, "--amp-dtype", "bf16", "--rounds", "1", "--threads",
                                 str(s.threads),
                                 "--work", str(work / f"train-{net}-{decoder}"), "--json"]
                units.append(Unit("train", f"{net} {decoder}", command + sources
                                  + _net_flags(s.train_options.get(net, {})), s.train_budget_s))
    return units


def _environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    for package in ("torchvision", "simplejpeg", "webdataset", "nvidia-dali-cuda120"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    kind = device_kind(device)
    backend = getattr(torch, kind, None)
    if kind != "cpu" and backend is not None and backend.is_available():
        env["device_name"] = backend.get_device_name(0) if hasattr(backend, "get_device_name") else kind
        env["device_count"] = backend.device_count()
    return env


def _make_shards(s: CheckSettings, work: Path) -> tuple[Optional[Path], dict[str, Any]]:
    from lresnet.train.bench import make_bench_shards

    start = time.perf_counter()
    record: dict[str, Any] = {"stage": "train", "name": "synth + convert shards",
                              "images": s.identities * s.images_per_id, "identities": s.identities}
    try:
        shards = make_bench_shards(work, s.identities, s.images_per_id, s.shard_size)
    except (InputError, OSError) as err:
        record.update(status="failed", error=str(err), seconds=round(time.perf_counter() - start, 1))
        return None, record
    record.update(status="ok", shards=str(shards), seconds=round(time.perf_counter() - start, 1))
    return shards, record


def run_device_check(settings: CheckSettings, work_dir: Path, install: Optional[dict[str, Any]] = None,
                     tests_dir: Optional[Path] = None, on_update: Optional[Callable[[dict], None]] = None,
                     say: Say = lambda message: None) -> dict[str, Any]:
    """Run the check; returns its report (``lresnet-device-check/1``), also passed to `on_update` after
    every unit.

    Args:
        install: the install stage's record, made by ``tools/device_check.sh`` before Python could import lresnet.
        tests_dir: where the tests are (default: ``tests`` beside this package's source, when there).
    """
    from lresnet.core.files import make_out_dir

    start = time.perf_counter()
    work = make_out_dir(work_dir)
    if tests_dir is None:
        candidate = Path(__file__).resolve().parents[1] / "tests"
        tests_dir = candidate if candidate.is_dir() else None
    report: dict[str, Any] = {"format": FORMAT, "settings": settings.as_dict(), "environment": _environment(settings.device),
                              "units": [install] if install else [], "seconds": 0.0}

    def publish() -> None:
        report["seconds"] = round(time.perf_counter() - start, 1)
        if on_update is not None:
            on_update(report)

    if "tests" in settings.stages and tests_dir is None:
        report["units"].append({"stage": "tests", "name": "pytest", "status": "skipped",
                                "error": "no tests folder beside the installed package"})
    shards = None
    if "train" in settings.stages:
        say(f"synthesizing and converting {settings.identities * settings.images_per_id} images for bench train")
        shards, record = _make_shards(settings, work)
        report["units"].append(record)
    publish()
    units = plan_units(settings, work, shards, tests_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cwd = tests_dir.parent if tests_dir is not None else work
    # what each later unit keeps when an earlier one runs long: at most MIN_UNIT_S, and together at
    # most half of the deadline
    floor = min(MIN_UNIT_S, settings.deadline_s / max(len(units), 1) / 2)
    for i, unit in enumerate(units):
        left = settings.deadline_s - (time.perf_counter() - start)
        keep = sum(min(u.budget_s, floor) for u in units[i + 1:])
        allowed = min(unit.budget_s, left - keep)
        if allowed < min(unit.budget_s, 10.0):
            record = {"stage": unit.stage, "name": unit.name, "status": "skipped",
                      "error": f"out of time: {left:.0f} s left of the {settings.deadline_s:.0f} s deadline"}
        else:
            say(f"{unit.stage}: {unit.name} (at most {allowed:.0f} s)")
            record = run_unit(unit, allowed, cwd, env)
        say(f"{unit.stage}: {unit.name}: {record['status']}"
            + (f" in {record['seconds']} s" if "seconds" in record else "")
            + (f": {record['error']}" if record.get("error") else ""))
        report["units"].append(record)
        publish()
    report["summary"] = summary_rows(report)
    publish()
    return report


# ----------------------------------------------------------------------------- the closing table

def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured thing: ``stage, what, images_per_s, mfu, data_wait, peak_gib, status``."""
    rows = []
    for unit in report["units"]:
        base = {"stage": unit["stage"], "what": unit["name"], "images_per_s": None, "mfu": None,
                "data_wait": None, "peak_gib": None}
        result = unit.get("result")
        if unit["status"] != "ok" or unit["stage"] == "tests" or not result:
            status = unit["status"]
            if unit["stage"] == "tests" and isinstance(result, dict) and result:
                status += ": " + ", ".join(f"{n} {word}" for word, n in result.items())
            if unit.get("error"):
                status += f": {unit['error']}"
            rows.append(dict(base, status=status + (f" ({unit['seconds']} s)" if "seconds" in unit else "")))
        elif unit["stage"] == "model":
            for r in result["results"]:
                rows.append(dict(base, what=f"{result['name']} batch {r['batch_size']} {r['setting']}",
                                 images_per_s=r["images_per_s"], mfu=r["mfu"],
                                 status=f"{r['ratio']:.2f}x baseline, first step {_seconds(r['first_step_s'])}"))
        elif unit["stage"] == "train":
            for r in result:
                rows.append(dict(base, what=f"{r['net']} batch {r['batch_size']} {r['source']}",
                                 images_per_s=r["images_per_s"], data_wait=r["data_wait"],
                                 peak_gib=r["peak_memory_bytes"] / 2**30,
                                 status=f"step only {r['images_per_s_step']:.0f} img/s"))
    return rows


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def summary_line(report: dict[str, Any]) -> str:
    """``"7 ok, 1 refused in 312 s"``: the units' statuses."""
    counts: dict[str, int] = {}
    for unit in report["units"]:
        counts[unit["status"]] = counts.get(unit["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items()) + f" in {report['seconds']:.0f} s"


def install_record(status: Optional[str], seconds: Optional[float], detail: Optional[str],
                   log: Optional[Path]) -> Optional[dict[str, Any]]:
    """The install stage's record from what ``tools/device_check.sh`` passes (None when it passed nothing)."""
    if status is None:
        return None
    record: dict[str, Any] = {"stage": "install", "name": "offline install", "status": status,
                              "seconds": seconds, "detail": detail}
    if log is not None and log.is_file() and status != "ok":
        record["log_tail"] = _tail(log.read_text(encoding="utf-8", errors="replace"))
    return record
