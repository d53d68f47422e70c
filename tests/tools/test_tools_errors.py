"""The CLI's error contract, table-driven over every command.

Bad input of each kind (wrong type, out of range, NaN, missing / unwritable / not-a-directory paths,
files of the wrong format) and faults of the environment (disk full, a read-only place, an interrupt)
end in one line on stderr, ``lresnet: error: WHERE: what`` (``lresnet: interrupted (SIGNAL)``), exit
code 2 (130 for an interrupt), and no traceback; a genuine bug keeps its traceback under a one-line
header and exits 1. Part 1 is generated from the CLI itself: every numeric option of every command is
given text. A new option is covered by Part 1 at once, and by a row here for its own checks.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from lresnet.tools.cli import app, main

# ----------------------------------------------------------------------------- running the CLI

def run_cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    """``lresnet ARGS`` in-process through the console entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lresnet", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line(code: int, err: str, *fragments: str, exit_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1, (code, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _commands():
    """(path, click command) of every command, the generated train command included."""
    from lresnet.tools.cmd_train import train_app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        if name == "train":
            yield ("train",), typer.main.get_command(train_app())
        elif hasattr(command, "commands"):
            for sub, sub_command in command.commands.items():
                yield (name, sub), sub_command
        else:
            yield (name,), command


def _is_number(param) -> bool:
    if hasattr(param, "bare_type"):  # typer's own parameters
        return str(param.bare_type()) in ("int", "float")
    return getattr(param.type, "name", "") in ("integer", "float")


def _numeric_options():
    for path, command in _commands():
        positional = [p for p in command.params if not p.opts[0].startswith("-")]
        for param in command.params:
            if param.opts[0].startswith("-") and _is_number(param):
                yield pytest.param(path, ["x"] * len(positional), param.opts[0], id=f"{' '.join(path)} {param.opts[0]}")


# ----------------------------------------------------------------------------- part 1: generated

@pytest.mark.parametrize("path, positional, option", list(_numeric_options()))
def test_every_numeric_option_refuses_text(path, positional, option, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*path, *positional, option, "many"], capsys, monkeypatch)
    assert_one_line(code, err, f"lresnet: error: {option}", f"see lresnet {' '.join(path)} --help")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_command_has_rows_of_its_own():
    everything = {path for path, _ in _commands()}
    in_rows = {tuple(args[:2]) if args[0] == "bench" else (args[0],) for _, args, _ in ROWS}
    assert everything <= in_rows, f"commands without a bad-input row: {sorted(everything - in_rows)}"


# ----------------------------------------------------------------------------- part 2: rows

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small, real inputs for every command: faces_emore, shards, a checkpoint, weights, images."""
    from lresnet.convert.synthetic import synthetic_shards
    from lresnet.model import create_backbone

    root = tmp_path_factory.mktemp("contract")
    synthetic_shards(root, identities=6, images_per_id=4, pairs=12, sets=("lfw",), seed=0, shard_size=12)
    net = create_backbone("mobilefacenet", embedding_size=16, bottlenecks=[[1, 8, 1, 2]], stem_channels=8,
                          head_channels=16)
    torch.save({"backbone": net.state_dict(), "step": 1,
                "config": {"model": {"net": "mobilefacenet", "embedding_size": 16,
                                     "options": {"bottlenecks": [[1, 8, 1, 2]], "stem_channels": 8,
                                                 "head_channels": 16}}}}, root / "ckpt.pt")
    (root / "file").write_text("a file, not a folder")
    (root / "garbage.pt").write_bytes(b"\x80\x04not a pickle")
    (root / "bad.toml").write_text("[optim\nlr = 1\n")
    manifest = json.loads((root / "shards" / "train" / "manifest.json").read_text())
    bad = root / "badmanifest" / "train"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "num_classes": -5}))
    escape = root / "escape" / "train"
    escape.mkdir(parents=True)
    shards = [dict(manifest["shards"][0], name="../../etc/passwd")] + manifest["shards"][1:]
    (escape / "manifest.json").write_text(json.dumps({**manifest, "shards": shards}))
    return root


def _readonly_place() -> str:
    """A folder nobody may create, root included (sysfs); None where this machine has none."""
    try:
        os.makedirs("/sys/lresnet-contract-probe")
    except OSError as err:
        if err.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return "/sys/lresnet-contract"
    return ""


READONLY = _readonly_place()
NEEDS_READONLY = pytest.mark.skipif(not READONLY, reason="no read-only place on this machine")

TRAIN = ["train", "--shards", "{root}/shards/train", "--out", "{tmp}/run", "--no-progress", "--workers", "0",
         "--batch-size", "4"]

# (id, arguments, fragments of the one line). {root}: the world fixture; {tmp}: this test's folder.
ROWS = [
    # synth
    ("synth identities 0", ["synth", "{tmp}/out", "--identities", "0"], ["--identities"]),
    ("synth difficulty nan", ["synth", "{tmp}/out", "--difficulty", "nan"],
     ["--difficulty: got nan, expected a finite number >= 0"]),
    ("synth too many pairs", ["synth", "{tmp}/out", "--pairs", "100000000000"],
     ["--pairs: got 100,000,000,000, expected at most 100,000 pairs per set"]),
    ("synth too many images", ["synth", "{tmp}/out", "--identities", "100000", "--images-per-id", "1000"],
     ["--identities/--images-per-id: got 100,000 x 1,000 images, expected at most 10,000,000"]),
    ("synth out is a file", ["synth", "{root}/file"],
     ["{root}/file: is a file, expected a folder (created if missing)"]),
    ("synth out under a file", ["synth", "{root}/file/s"], ["{root}/file/s: cannot create the folder: Not a directory"]),
    # convert-rec
    ("convert missing source", ["convert-rec", "{tmp}/none", "{tmp}/o"], ["{tmp}/none", "not found"]),
    ("convert source is a file", ["convert-rec", "{root}/file", "{tmp}/o"], ["{root}/file"]),
    ("convert shard size 0", ["convert-rec", "{root}/faces", "{tmp}/o", "--shard-size", "0"], ["--shard-size"]),
    ("convert workers 0", ["convert-rec", "{root}/faces", "{tmp}/o", "--workers", "0"], ["--workers"]),
    ("convert out is a file", ["convert-rec", "{root}/faces", "{root}/file"], ["{root}/file", "is a file"]),
    ("convert out cannot be created", ["convert-rec", "{root}/faces", "{root}/file/out"],
     ["{root}/file/out/train: cannot create the folder: Not a directory"]),
    ("convert negative seed", ["convert-rec", "{root}/faces", "{tmp}/out", "--seed", "-1"],
     ["--seed: got -1, expected a non-negative integer"]),
    ("convert set with a path", ["convert-rec", "{root}/faces", "{tmp}/out", "--sets", "../x"],
     ["--sets: got '../x', expected plain set names like lfw,agedb_30 (file names in the source folder, "
      "without a path)"]),
    ("convert unknown reader", ["convert-rec", "{root}/faces", "{tmp}/out", "--reader", "dmlc"],
     ["--reader: got 'dmlc', expected one of pure, mxnet"]),
    # inspect
    ("inspect no manifest", ["inspect", "{tmp}"], ["{tmp}", "manifest.json"]),
    ("inspect a shard", ["inspect", "{root}/shards/train/train-000000.tar"], ["train-000000.tar"]),
    ("inspect negative classes", ["inspect", "{root}/badmanifest"], ["manifest.json", "num_classes"]),
    ("inspect path in a shard name", ["inspect", "{root}/escape", "--verify"], ["../../etc/passwd"]),
    # model-info
    ("model-info unknown net", ["model-info", "resnet9000"], ["unknown backbone 'resnet9000'"]),
    ("model-info embedding 0", ["model-info", "--embedding-size", "0"],
     ["--embedding-size: got 0, expected a positive integer"]),
    ("model-info embedding -4", ["model-info", "ir18", "--embedding-size", "-4"],
     ["--embedding-size: got -4, expected a positive integer"]),
    ("model-info weights missing", ["model-info", "--weights", "{tmp}/none.pt"], ["{tmp}/none.pt"]),
    ("model-info weights garbage", ["model-info", "--weights", "{root}/garbage.pt"], ["{root}/garbage.pt"]),
    # verify
    ("verify no data", ["verify", "--set", "lfw", "--checkpoint", "{root}/ckpt.pt"], ["--data"]),
    ("verify unknown set", ["verify", "--set", "nope", "--data", "{root}/shards/val", "--checkpoint",
                            "{root}/ckpt.pt"], ["unknown verification set 'nope'"]),
    ("verify folds 0", ["verify", "--set", "lfw", "--data", "{root}/shards/val", "--checkpoint", "{root}/ckpt.pt",
                        "--folds", "0"], ["--folds"]),
    ("verify garbage checkpoint", ["verify", "--set", "lfw", "--data", "{root}/shards/val", "--checkpoint",
                                   "{root}/garbage.pt"], ["{root}/garbage.pt"]),
    ("verify checkpoint is a folder", ["verify", "--set", "lfw", "--data", "{root}/shards/val", "--checkpoint",
                                       "{root}/shards"], ["{root}/shards"]),
    ("verify embeddings not npy", ["verify", "--set", "lfw", "--data", "{root}/shards/val", "--embeddings",
                                   "{root}/file"], ["{root}/file", ".npy"]),
    ("verify unknown device", ["verify", "--set", "lfw", "--data", "{root}/shards/val", "--checkpoint",
                               "{root}/ckpt.pt", "--device", "tpu"], ["--device", "got 'tpu'"]),
    ("verify unknown amp", ["verify", "--set", "lfw", "--data", "{root}/shards/val", "--checkpoint",
                            "{root}/ckpt.pt", "--amp", "int8"], ["--amp", "got 'int8'"]),
    # train
    ("train lr nan", [*TRAIN, "--lr", "nan"], ["optim.lr", "finite"]),
    ("train batch 0", [*TRAIN, "--batch-size", "0"], ["data.batch_size", "got 0"]),
    ("train batch too large", [*TRAIN, "--batch-size", "1000"], ["give no batch of 1000"]),
    ("train out is a file", [*TRAIN, "--out", "{root}/file"], ["{root}/file", "is a file"]),
    ("train missing shards", ["train", "--shards", "{tmp}/none", "--out", "{tmp}/run"], ["{tmp}/none"]),
    ("train config missing", [*TRAIN, "--config", "{tmp}/none.toml"], ["{tmp}/none.toml", "not found"]),
    ("train config garbage", [*TRAIN, "--config", "{root}/bad.toml"], ["{root}/bad.toml", "cannot parse"]),
    ("train unknown net option", [*TRAIN, "--net", "mobilefacenet", "--net-option", "nosuchkw=3"],
     ["mobilefacenet", "nosuchkw"]),
    ("train unparsable net option", [*TRAIN, "--net", "ir18", "--net-option", "widths=[1,2"], ["widths"]),
    ("train negative channels", [*TRAIN, "--net", "mobilefacenet", "--net-option", "stem_channels=-3"],
     ["stem_channels"]),
    ("train combined m1 -1", [*TRAIN, "--head", "combined", "--m1", "-1"], ["head.m1", "got -1.0"]),
    ("train unknown decoder", [*TRAIN, "--decoder", "opencv"], ["data.decoder", "got 'opencv'"]),
    ("train negative classes", ["train", "--shards", "{root}/badmanifest/train", "--out", "{tmp}/run"],
     ["num_classes"]),
    ("train unknown option", [*TRAIN, "--learning-rate", "1"], ["--learning-rate", "no such option"]),
    # demo
    ("demo minutes -1", ["demo", "--out", "{tmp}/d", "--minutes", "-1"], ["--minutes", "got -1.0"]),
    ("demo out is a file", ["demo", "--out", "{root}/file"], ["{root}/file", "is a file"]),
    # export / embed / synth-ijb
    ("export weights missing", ["export", "--onnx", "{tmp}/m.onnx", "--weights", "{tmp}/none.pt"], ["{tmp}/none.pt"]),
    ("export no source", ["export", "--onnx", "{tmp}/m.onnx"], ["--checkpoint"]),
    ("embed missing input", ["embed", "{tmp}/none", "--out", "{tmp}/e.npy", "--checkpoint", "{root}/ckpt.pt"],
     ["{tmp}/none"]),
    ("synth-ijb root is a file", ["synth-ijb", "{root}/file"], ["{root}/file"]),
    # benchmarks
    ("bench model unknown net", ["bench", "model", "resnet9000"], ["unknown backbone"]),
    ("bench pipeline too few images", ["bench", "pipeline", "--images", "5"], ["--images"]),
    ("bench verify unknown net", ["bench", "verify", "--net", "resnet9000"], ["unknown backbone"]),
    ("bench train missing shards", ["bench", "train", "--shards", "{tmp}/none", "--work", "{tmp}/w"], ["{tmp}/none"]),
    ("bench ijb negative images", ["bench", "ijb", "--images", "-5"], ["--images"]),
    ("bench convert no images", ["bench", "convert", "--images", "0", "--data-dir", "{tmp}/b"], ["--images"]),
    ("bench device unknown stage", ["bench", "device", "--stage", "everything", "--out", "{tmp}/d"], ["--stage"]),
]

READONLY_ROWS = [
    ("synth into a read-only place", ["synth", "{ro}/s"], ["{ro}/s", "cannot create"]),
    ("convert into a read-only place", ["convert-rec", "{root}/faces", "{ro}/o"], ["{ro}/o"]),
    ("train into a read-only place", [*TRAIN, "--out", "{ro}/run"], ["{ro}/run", "cannot create"]),
    ("demo into a read-only place", ["demo", "--out", "{ro}/d"], ["{ro}/d", "cannot create"]),
    ("verify roc into a read-only place", ["verify", "--set", "lfw", "--data", "{root}/shards/val",
                                           "--checkpoint", "{root}/ckpt.pt", "--roc", "{ro}/roc.png"], ["{ro}/roc.png"]),
    ("embed into a read-only place", ["embed", "{root}/faces/lfw.bin", "--out", "{ro}/e.npy", "--checkpoint",
                                      "{root}/ckpt.pt"], ["{ro}"]),
    ("export into a read-only place", ["export", "--onnx", "{ro}/m.onnx", "--checkpoint", "{root}/ckpt.pt"], ["{ro}"]),
]


def _fill(items, world, tmp_path):
    fill = {"root": world, "tmp": tmp_path, "ro": READONLY}
    return [str(item).format(**fill) for item in items]


@pytest.mark.parametrize("args, fragments", [pytest.param(a, f, id=i) for i, a, f in ROWS])
def test_bad_input_is_one_line_exit_2(args, fragments, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(_fill(args, world, tmp_path), capsys, monkeypatch)
    assert_one_line(code, err, "lresnet: error: ", *_fill(fragments, world, tmp_path))
    assert not (tmp_path / "out").exists()  # bad settings are refused before anything is written


def test_mxnet_reader_without_mxnet_says_how_to_install_it(world, tmp_path, capsys, monkeypatch):
    from lresnet.convert.recordio import import_mxnet_recordio
    from lresnet.core.errors import InputError

    try:
        import_mxnet_recordio()
        pytest.skip("mxnet is importable here")
    except InputError:
        pass
    code, _, err = run_cli(["convert-rec", world / "faces", tmp_path / "out", "--reader", "mxnet"], capsys, monkeypatch)
    line = assert_one_line(code, err, "lresnet: error: --reader: got 'mxnet', but mxnet ")
    assert "numpy < 1.24" in line and "--reader pure" in line
    assert not (tmp_path / "out").exists()


@NEEDS_READONLY
@pytest.mark.parametrize("args, fragments", [pytest.param(a, f, id=i) for i, a, f in READONLY_ROWS])
def test_a_place_that_cannot_be_written_is_one_line_exit_2(args, fragments, world, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(_fill(args, world, tmp_path), capsys, monkeypatch)
    assert_one_line(code, err, "lresnet: error: ", *_fill(fragments, world, tmp_path))


# ----------------------------------------------------------------------------- part 3: the environment

def _small_files(limit: int):
    def cap() -> None:  # writes past `limit` bytes fail with EFBIG, as a full disk fails them with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return cap


@pytest.mark.slow
@pytest.mark.parametrize("args, limit, fragment", [
    pytest.param(["synth", "{tmp}/s", "--identities", "20", "--images-per-id", "10"], 64 * 1024, "{tmp}/s",
                 id="synth"),
    pytest.param([*TRAIN, "--net", "mobilefacenet", "--embedding-size", "16", "--net-option", "stem_channels=8",
                  "--net-option", "head_channels=16", "--net-option", "bottlenecks=[[1,8,1,2]]", "--batch-size", "4",
                  "--max-steps", "2", "--threads", "1"], 32 * 1024, "{tmp}/run/ckpt-00000002.pt", id="train"),
])
def test_a_full_disk_is_one_line_in_a_real_process(args, limit, fragment, world, tmp_path):
    """Run for real (subprocess): stderr holds exactly the one line, nothing logged before it."""
    proc = subprocess.run([sys.executable, "-m", "lresnet.tools", *_fill(args, world, tmp_path)],
                          capture_output=True, text=True, preexec_fn=_small_files(limit), timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = assert_one_line(proc.returncode, proc.stderr, "lresnet: error: ", "File too large")
    assert _fill([fragment], world, tmp_path)[0] in line
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize("raised, code, line", [
    (lambda: __import__("lresnet.core.interrupt", fromlist=["x"]).Interrupted(signal.SIGINT), 130,
     "lresnet: interrupted (SIGINT)"),
    (lambda: __import__("lresnet.core.interrupt", fromlist=["x"]).Interrupted(signal.SIGTERM), 143,
     "lresnet: interrupted (SIGTERM)"),
    (lambda: KeyboardInterrupt(), 130, "lresnet: interrupted"),
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/data/out/train.rec"), 2,
     "lresnet: error: /data/out/train.rec: No space left on device"),
    (lambda: MemoryError(), 2, "lresnet: error: out of memory"),
])
def test_interrupts_and_faults_anywhere_are_one_line(raised, code, line, tmp_path, capsys, monkeypatch):
    import lresnet.convert.synthetic as synthetic

    def fail(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(synthetic, "synthesize", fail)
    got, _, err = run_cli(["synth", tmp_path / "s"], capsys, monkeypatch)
    assert got == code and err.strip().splitlines()[0].startswith(line) and len(err.strip().splitlines()) == 1


def test_a_bug_keeps_its_traceback_under_a_one_line_header(tmp_path, capsys, monkeypatch):
    import lresnet.convert.synthetic as synthetic

    def buggy(*args, **kwargs):
        return {}["missing key"]

    monkeypatch.setattr(synthetic, "synthesize", buggy)
    code, _, err = run_cli(["synth", tmp_path / "s"], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 1
    assert lines[0] == "lresnet: this is a bug in lresnet; please report it with the traceback below"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'missing key'"


def test_one_line_holds_in_a_real_process_too(world, tmp_path):
    """A few rows run for real: no warning or log line printed before the error."""
    for args in (["convert-rec", "{root}/faces", "{root}/file"], [*TRAIN, "--lr", "nan"],
                 ["inspect", "{root}/badmanifest"], ["verify", "--set", "nope", "--data", "{root}/shards/val",
                                                      "--checkpoint", "{root}/ckpt.pt"]):
        proc = subprocess.run([sys.executable, "-m", "lresnet.tools", *_fill(args, world, tmp_path)],
                              capture_output=True, text=True, timeout=300)
        assert_one_line(proc.returncode, proc.stderr, "lresnet: error: ")
