"""lresnet convert-rec / inspect / bench convert: output, --json, and every bad-input case (exit 2, one line)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lresnet.convert.recordio import FacesEmore
from lresnet.tools.cli import main
from lresnet.convert.synthetic import synthesize


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "faces_emore"
    synthesize(out, identities=5, images_per_id=4, pairs=2, seed=1, sets=("lfw",))
    return out


def run_cli(args, capsys, monkeypatch):
    """Call the console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lresnet", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lresnet: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _record_offset(folder: Path, nth_image: int = 2):
    with FacesEmore(folder) as fe:
        key = fe.image_keys[nth_image]
        return key, fe.reader.offset(key)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_convert_prints_summary_table_and_inspect_verifies(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["convert-rec", src, out, "--shard-size", "8", "--workers", "2"],
                              capsys, monkeypatch)
    assert code == 0
    assert "convert-rec summary" in stdout and "20" in stdout and "lfw (2)" in stdout
    code, stdout, _ = run_cli(["inspect", out, "--verify", "--json"], capsys, monkeypatch)
    assert code == 0
    info = json.loads(stdout)
    assert info["num_samples"] == 20 and info["num_shards"] == 3
    assert info["verified"] == {"shards": 3, "val_sets": 1, "bytes": info["verified"]["bytes"]}
    code, stdout, _ = run_cli(["inspect", out], capsys, monkeypatch)
    assert code == 0 and "lresnet-shards/1" in stdout


def test_convert_json_summary(src, tmp_path, capsys, monkeypatch):
    code, stdout, _ = run_cli(["convert-rec", src, tmp_path, "--shard-size", "50", "--no-shuffle",
                               "--sets", "lfw", "--seed", "5", "--json"], capsys, monkeypatch)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["num_samples"] == 20 and summary["num_shards"] == 1 and summary["val"] == {"lfw": 2}
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["shuffle"] is False


def test_inspect_verify_names_every_damaged_shard(src, tmp_path, capsys, monkeypatch):
    assert run_cli(["convert-rec", src, tmp_path, "--shard-size", "8", "--json"], capsys, monkeypatch)[0] == 0
    _patch(tmp_path / "train" / "train-000002.tar", 600, b"\xff")
    (tmp_path / "train" / "train-000000.tar").unlink()
    code, _, err = run_cli(["inspect", tmp_path, "--verify"], capsys, monkeypatch)
    assert_one_line_error(code, err, "train-000002.tar: sha256", "2 of")
    assert "train-000000.tar: listed in the manifest, missing" in err


def test_inspect_refuses_unfinished_and_foreign_folders(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["inspect", tmp_path], capsys, monkeypatch)
    assert_one_line_error(code, err, str(tmp_path), "manifest.json")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "convert-state.json").write_text("{}")
    code, _, err = run_cli(["inspect", tmp_path], capsys, monkeypatch)
    assert_one_line_error(code, err, "convert-state.json", "incomplete")


# ---------------------------------------------------------------- bad input: exit 2, one line
def _missing_rec(src, d):
    (_copy(src, d) / "train.rec").unlink()
    return ["train.rec"]


def _missing_property(src, d):
    (_copy(src, d) / "property").unlink()
    return ["property"]


def _truncated_rec(src, d):
    _copy(src, d)
    rec = d / "train.rec"
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size // 2])
    return ["train.rec", "past the end"]


def _truncated_rec_without_idx(src, d):
    _copy(src, d)
    (d / "train.idx").unlink()
    rec = d / "train.rec"
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size // 2 + 3])
    return ["train.rec", "offset"]


def _bad_magic(src, d):
    key, offset = _record_offset(_copy(src, d))
    _patch(d / "train.rec", offset, b"\xde\xad\xbe\xef")
    return ["train.rec", f"record {key}", "magic"]


def _idx_past_end(src, d):
    _copy(src, d)
    with open(d / "train.idx", "a") as f:
        f.write("999\t99999999\n")
    return ["train.idx", "past the end"]


def _label_out_of_range(src, d):
    key, offset = _record_offset(_copy(src, d))
    _patch(d / "train.rec", offset + 8 + 4, struct.pack("<f", 1000.0))  # IRHeader.label
    return ["train.rec", f"record {key}", "out of range"]


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(_Exploit.marker),))


def _malicious_bin(src, d):
    _copy(src, d)
    _Exploit.marker = str(d / "PWNED")
    with open(d / "lfw.bin", "wb") as f:
        pickle.dump(([b"\xff\xd8x", _Exploit()], [True]), f, protocol=2)
    return ["lfw.bin"]


def _malformed_bin(src, d):
    _copy(src, d)
    (d / "lfw.bin").write_bytes(b"\x80\x02garbage, not a pickle" * 3)
    return ["lfw.bin"]


def _unknown_set(src, d):
    _copy(src, d)
    return ["calfw.bin"]


BAD_INPUTS = [_missing_rec, _missing_property, _truncated_rec, _truncated_rec_without_idx, _bad_magic,
              _idx_past_end, _label_out_of_range, _malicious_bin, _malformed_bin, _unknown_set]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_exit_2_without_complete_looking_output(make_bad, src, tmp_path, capsys,
                                                                      monkeypatch):
    bad = tmp_path / "bad"
    needles = make_bad(src, bad)
    out = tmp_path / "out"
    args = ["convert-rec", bad, out, "--shard-size", "4"]
    if make_bad is _unknown_set:
        args += ["--sets", "lfw,calfw"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert not (out / "train" / "manifest.json").exists()
    assert not list(out.rglob(".*.tmp"))
    assert not (bad / "PWNED").exists()         # the pickle's payload never ran


def test_skip_corrupt_reports_the_count(src, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    _label_out_of_range(src, bad)
    code, stdout, _ = run_cli(["convert-rec", bad, tmp_path / "out", "--skip-corrupt", "--json"],
                              capsys, monkeypatch)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["skipped_corrupt"] == 1 and summary["num_samples"] == 19
    assert any("skipped 1 corrupt" in w for w in summary["warnings"])


def test_failed_run_never_touches_complete_shards_of_an_earlier_run(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(["convert-rec", src, out, "--shard-size", "8"], capsys, monkeypatch)[0] == 0
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    bad = tmp_path / "bad"
    _label_out_of_range(src, bad)
    code, _, err = run_cli(["convert-rec", bad, out, "--shard-size", "8"], capsys, monkeypatch)
    assert_one_line_error(code, err, "convert-state.json", "source changed")
    code, _, err = run_cli(["convert-rec", src, out, "--shard-size", "4"], capsys, monkeypatch)
    assert_one_line_error(code, err, "shard_size 8 -> 4")
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before


def test_console_script_exit_code_and_single_line(src, tmp_path):
    """The real entry point in a subprocess: stderr is exactly one line, exit code 2."""
    bad = tmp_path / "bad"
    _label_out_of_range(src, bad)
    res = subprocess.run([sys.executable, "-m", "lresnet.tools", "convert-rec", str(bad), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("lresnet: error: ")
    assert "train.rec" in res.stderr and "out of range" in res.stderr


@pytest.mark.slow
def test_bench_convert_runs_and_reports(tmp_path, capsys, monkeypatch):
    code, stdout, _ = run_cli(["bench", "convert", "--images", "40", "--workers", "2", "--shard-size", "8",
                               "--data-dir", tmp_path, "--index-records", "3000", "--json"],
                              capsys, monkeypatch)
    assert code == 0
    r = json.loads(stdout)
    assert r["images"] == 40 and r["copy_mb_s"] > 0 and r["convert_mb_s"] > 0 and r["ratio_to_copy"] > 0
    assert r["convert_cpu_us_per_image"] > 0
    assert set(r["rss"]) == {"10", "40"}
    assert all(v["main_mb"] > 0 and v["worker_mb"] > 0 for v in r["rss"].values())
    assert r["index_rss"]["records"] == 3000 and r["index_rss"]["main_mb"] > 0
    assert not (tmp_path / "work" / "copy.rec").exists()


def test_index_only_set_for_the_memory_bench(tmp_path):
    """The bench's faces_emore-sized index-only set, written with the project's RecordWriter, reads
    back as image records 1..N in classes of 68; it is reused when asked for again; the
    fresh-interpreter entry point measures it."""
    from lresnet.convert.bench import PER_CLASS, ensure_index_only

    folder = ensure_index_only(tmp_path / "idx", 150)
    with FacesEmore(folder) as fe:
        assert fe.image_key_range == range(1, 151) and fe.num_classes == 3 and fe.header_key == 0
        assert fe.read_image(150) == (149 // PER_CLASS, b"\xff\xd8" + bytes(38))
    stamp = (folder / "train.rec").stat().st_mtime_ns
    assert ensure_index_only(tmp_path / "idx", 150) == folder
    assert (folder / "train.rec").stat().st_mtime_ns == stamp
    res = subprocess.run([sys.executable, "-m", "lresnet.convert.bench", "index", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    measured = json.loads(res.stdout)
    assert measured["records"] == 150 and measured["rss_kb"] >= measured["rss_imports_kb"] > 0
