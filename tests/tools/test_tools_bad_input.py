"""Bad values for synth / convert-rec / model-info: one line ``lresnet: error: WHERE: what`` on stderr,
exit code 2, nothing written (the CLI's console entry point, run in-process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lresnet.convert.synthetic import synthesize
from lresnet.core.errors import InputError
from lresnet.tools.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "faces_emore"
    synthesize(out, identities=3, images_per_id=2, pairs=2, seed=0, sets=("lfw",))
    return out


def _mxnet_importable() -> bool:
    from lresnet.convert.recordio import import_mxnet_recordio

    try:
        import_mxnet_recordio()
    except InputError:
        return False
    return True


# (id, arguments, the exact error line); {src} is a small faces_emore folder, {tmp} a fresh folder
# holding a file named "file", and {out} a path in it that must not exist afterwards.
CASES = [
    ("model-info embedding 0", ["model-info", "--embedding-size", "0"],
     "--embedding-size: got 0, expected a positive integer"),
    ("model-info embedding -4", ["model-info", "ir18", "--embedding-size", "-4"],
     "--embedding-size: got -4, expected a positive integer"),
    ("synth too many pairs", ["synth", "{out}", "--pairs", "100000000000"],
     "--pairs: got 100,000,000,000, expected at most 100,000 pairs per set"),
    ("synth too many images", ["synth", "{out}", "--identities", "100000", "--images-per-id", "1000"],
     "--identities/--images-per-id: got 100,000 x 1,000 images, expected at most 10,000,000"),
    ("synth difficulty nan", ["synth", "{out}", "--difficulty", "nan"],
     "--difficulty: got nan, expected a finite number >= 0"),
    ("synth out is a file", ["synth", "{tmp}/file"],
     "{tmp}/file: is a file, expected a folder (created if missing)"),
    ("synth out under a file", ["synth", "{tmp}/file/sub", "--pairs", "2"],
     "{tmp}/file/sub: cannot create the folder: Not a directory"),
    ("convert out is a file", ["convert-rec", "{src}", "{tmp}/file"],
     "{tmp}/file: is a file, expected a folder (created if missing)"),
    ("convert out cannot be created", ["convert-rec", "{src}", "{tmp}/file/out"],
     "{tmp}/file/out/train: cannot create the folder: Not a directory"),
    ("convert negative seed", ["convert-rec", "{src}", "{out}", "--seed", "-1"],
     "--seed: got -1, expected a non-negative integer"),
    ("convert set with a path", ["convert-rec", "{src}", "{out}", "--sets", "../x"],
     "--sets: got '../x', expected plain set names like lfw,agedb_30 (file names in the source folder, "
     "without a path)"),
    ("convert unknown reader", ["convert-rec", "{src}", "{out}", "--reader", "dmlc"],
     "--reader: got 'dmlc', expected one of pure, mxnet"),
]


@pytest.mark.parametrize("args,expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_value_is_one_line_exit_2(args, expected, src, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    fill = dict(src=src, tmp=tmp_path, out=tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["lresnet", *(a.format(**fill) for a in args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["lresnet: error: " + expected.format(**fill)], err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(_mxnet_importable(), reason="mxnet is importable here")
def test_mxnet_reader_without_mxnet_says_how_to_install_it(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lresnet", "convert-rec", str(src), str(tmp_path / "out"), "--reader", "mxnet"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lresnet: error: --reader: got 'mxnet', but mxnet ")
    assert "numpy < 1.24" in line and "--reader pure" in line
    assert not (tmp_path / "out").exists()
