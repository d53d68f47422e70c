"""convert_rec end to end on tiny synthetic faces_emore sets: content, order, resume, workers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lresnet.convert import (
    InputError,
    convert_rec,
    read_dali_index,
    read_manifest,
    shuffle_plan,
    verify_shards,
)
from lresnet.convert.pairs import load_bin
from lresnet.convert.recordio import FacesEmore
from lresnet.convert.synthetic import synthesize


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """48 images of 8 identities, 4 pairs in each of lfw / agedb_30 / cfp_fp."""
    out = tmp_path_factory.mktemp("emore") / "faces_emore"
    synthesize(out, identities=8, images_per_id=6, pairs=4, seed=0)
    return out


@pytest.fixture(scope="module")
def source_records(src):
    with FacesEmore(src) as fe:
        return {k: fe.read_image(k) for k in fe.image_keys}


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = convert_rec(src, out, shard_size=10, seed=3)
    return out, summary


def _tar_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".tar", ".idx", ".json")}


def _read_train(out: Path):
    import webdataset as wds

    samples = []
    for shard in read_manifest(out)["shards"]:
        path = out / "train" / shard["name"]
        got = list(wds.WebDataset(str(path), shardshuffle=False))
        assert len(got) == shard["count"]
        samples += [(s["__key__"], s["jpg"], s["cls"]) for s in got]
    return samples


def test_every_sample_round_trips_through_webdataset(converted, source_records):
    out, summary = converted
    samples = _read_train(out)
    assert len(samples) == len(source_records) == summary.num_samples == 48
    for key, jpg, cls in samples:
        assert len(key) == 9 and key.isdigit()
        label, jpeg = source_records[int(key)]
        assert jpg == jpeg                      # original bytes, never re-encoded
        assert cls == str(label).encode("ascii")
    assert sorted(int(k) for k, _, _ in samples) == sorted(source_records)


def test_manifest_fields_and_shards(converted, src):
    out, summary = converted
    m = read_manifest(out)
    assert m["format"] == "lresnet-shards/1"
    assert (m["num_samples"], m["num_classes"], m["image_size"], m["seed"]) == (48, 8, [112, 112], 3)
    assert [s["name"] for s in m["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["count"] for s in m["shards"]] == [10, 10, 10, 10, 8]
    assert m["source"]["rec_bytes"] == (src / "train.rec").stat().st_size
    assert summary.num_shards == 5 and summary.shards_written == 5 and summary.classes_with_images == 8
    assert verify_shards(out).shards == 5
    assert not list((out / "train").glob(".*.tmp"))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_lists_every_shard(converted):
    out, _ = converted
    for shard in read_manifest(out)["shards"]:
        res = subprocess.run(["tar", "-tf", str(out / "train" / shard["name"])],
                             capture_output=True, text=True, check=True)
        names = res.stdout.split()
        assert len(names) == 2 * shard["count"] and res.stderr == ""
        assert all(n.endswith((".jpg", ".cls")) for n in names)


def test_dali_index_beside_each_shard_matches_tar(converted):
    out, _ = converted
    for shard in read_manifest(out)["shards"]:
        tar_path = out / "train" / shard["name"]
        index = read_dali_index(tar_path.with_suffix(".idx"))
        assert len(index) == shard["count"]
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
        flat = [c for sample in index for c in sample]
        assert [(c[1], c[2], c[3]) for c in flat] == [(m.offset_data, m.size, m.name) for m in members]
        assert all(c[0] == c[3].split(".", 1)[1] for c in flat)


def test_order_is_the_seeded_global_shuffle(converted, src, source_records):
    out, _ = converted
    keys = [int(k) for k, _, _ in _read_train(out)]
    with FacesEmore(src) as fe:
        image_keys = fe.image_keys
    assert keys == shuffle_plan(image_keys, 3).tolist()
    assert keys != sorted(keys) and keys != shuffle_plan(image_keys, 4).tolist()
    labels_first_shard = {source_records[k][0] for k in keys[:10]}
    assert len(labels_first_shard) > 2          # shards mix identities


def test_no_shuffle_keeps_record_order(src, tmp_path):
    convert_rec(src, tmp_path, shard_size=20, shuffle=False, sets=[])
    keys = [int(k) for k, _, _ in _read_train(tmp_path)]
    assert keys == sorted(keys)
    assert not (tmp_path / "val").exists()


def test_val_sets_in_original_pair_order(converted, src):
    import webdataset as wds

    out, summary = converted
    assert summary.val == {"agedb_30": 4, "cfp_fp": 4, "lfw": 4}
    for name in ("lfw", "agedb_30", "cfp_fp"):
        pairs = load_bin(src / f"{name}.bin")
        got = list(wds.WebDataset(str(out / "val" / f"{name}.tar"), shardshuffle=False))
        assert [s["__key__"] for s in got] == [f"{k:06d}" for k in range(4)]
        for k, s in enumerate(got):
            assert s["a.jpg"] == pairs.images[2 * k] and s["b.jpg"] == pairs.images[2 * k + 1]
            assert s["same"] == (b"1" if pairs.issame[k] else b"0")


def test_sets_option_selects_and_names_a_missing_bin(src, tmp_path):
    s = convert_rec(src, tmp_path / "a", shard_size=100, sets=["lfw"])
    assert s.val == {"lfw": 4} and sorted(p.name for p in (tmp_path / "a" / "val").iterdir()) == ["lfw.tar"]
    with pytest.raises(InputError, match=r"calfw\.bin: file not found"):
        convert_rec(src, tmp_path / "b", sets=["lfw", "calfw"])


def test_workers_2_equals_workers_1(src, tmp_path):
    s1 = convert_rec(src, tmp_path / "w1", shard_size=7, workers=1)
    s2 = convert_rec(src, tmp_path / "w2", shard_size=7, workers=2)
    assert s1.num_shards == s2.num_shards == 7
    assert _tar_bytes(tmp_path / "w1") == _tar_bytes(tmp_path / "w2")


@pytest.mark.parametrize("setting", [("_MAX_SPAN", 1 << 8), ("GAP", 1 << 30), ("BATCH", 3)])
def test_read_paths_and_batches_write_the_same_bytes(src, tmp_path, monkeypatch, setting):
    """Every record through the slow path, every batch read as one run, tiny batches: same bytes."""
    reference = convert_rec(src, tmp_path / "ref", shard_size=7, sets=[])
    name, value = setting
    module = sys.modules["lresnet.convert.convert_rec"]
    monkeypatch.setattr(module.RecordFetcher if name != "BATCH" else module, name, value)
    other = convert_rec(src, tmp_path / "other", shard_size=7, sets=[])
    assert other.num_samples == reference.num_samples == 48
    assert _tar_bytes(tmp_path / "ref") == _tar_bytes(tmp_path / "other")


def test_rerun_reuses_complete_output_and_refuses_other_settings(converted, src, tmp_path):
    out, _ = converted
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = _tar_bytes(work)
    again = convert_rec(src, work, shard_size=10, seed=3)
    assert (again.shards_written, again.shards_reused) == (0, 5)
    assert _tar_bytes(work) == before
    with pytest.raises(InputError, match=r"manifest\.json: holds a conversion made with other settings "
                                         r"\(seed 3 -> 4\)"):
        convert_rec(src, work, shard_size=10, seed=4)
    assert _tar_bytes(work) == before


def test_damaged_complete_shard_is_rewritten_on_rerun(src, tmp_path):
    convert_rec(src, tmp_path, shard_size=16, sets=[])
    good = _tar_bytes(tmp_path)
    shard = tmp_path / "train" / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="train-000001.tar: sha256"):
        verify_shards(tmp_path)
    again = convert_rec(src, tmp_path, shard_size=16, sets=[])
    assert (again.shards_written, again.shards_reused) == (1, 2)
    assert _tar_bytes(tmp_path) == good


def _corrupt_jpeg(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` with the JPEG marker of one image record destroyed; returns its key."""
    shutil.copytree(src, dst)
    with FacesEmore(dst) as fe:
        key = fe.image_keys[5]
        offset = fe.reader.offset(key)
    with open(dst / "train.rec", "r+b") as f:
        f.seek(offset + 8 + 24)                 # part header, IRHeader (scalar label)
        f.write(b"\x00\x00\x00\x00")
    return key


def test_corrupt_record_fails_cleanly_or_is_skipped(src, tmp_path):
    bad = tmp_path / "bad"
    key = _corrupt_jpeg(src, bad)
    with pytest.raises(InputError) as err:
        convert_rec(bad, tmp_path / "o1", shard_size=10, sets=[])
    assert "train.rec" in str(err.value) and f"record {key}" in str(err.value)
    assert not (tmp_path / "o1" / "train" / "manifest.json").exists()
    assert not list((tmp_path / "o1" / "train").glob(".*.tmp"))

    s = convert_rec(bad, tmp_path / "o2", shard_size=10, sets=[], skip_corrupt=True)
    assert s.skipped_corrupt == 1 and s.num_samples == 47
    assert any("skipped 1 corrupt" in w for w in s.warnings)
    assert key not in {int(k) for k, _, _ in _read_train(tmp_path / "o2")}
    assert read_manifest(tmp_path / "o2")["skipped_corrupt"] == 1


def test_corrupt_record_fails_cleanly_with_workers(src, tmp_path):
    bad = tmp_path / "bad"
    key = _corrupt_jpeg(src, bad)
    with pytest.raises(InputError, match=f"record {key}"):
        convert_rec(bad, tmp_path / "o", shard_size=4, workers=2, sets=[])
    assert not (tmp_path / "o" / "train" / "manifest.json").exists()
    assert not list((tmp_path / "o" / "train").glob(".*.tmp"))


# A conversion that pauses after each shard, so it can be killed in the middle.
_SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from lresnet.convert import shards
    from lresnet.convert.convert_rec import convert_rec
    close = shards.TarShardWriter.close
    def slow_close(self):
        info = close(self)
        time.sleep(0.15)
        return info
    shards.TarShardWriter.close = slow_close
    convert_rec(sys.argv[1], sys.argv[2], shard_size=3, workers=int(sys.argv[3]), sets=[])
""")


def _recorded_shards(out: Path) -> dict:
    try:
        return json.loads((out / "train" / "convert-state.json").read_text())["shards"]
    except FileNotFoundError:
        return {}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_rerun_gives_the_same_manifest(src, tmp_path, workers):
    reference = tmp_path / "ref"
    convert_rec(src, reference, shard_size=3, workers=1, sets=[])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(src), str(out), str(workers)],
                            start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while len(_recorded_shards(out)) < 2:
            assert proc.poll() is None, "conversion ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)       # kill -9 the converter (its workers must follow)
        proc.wait()
    try:
        while True:                             # no orphaned worker outlives it for long
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "workers outlived the killed converter"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a process behind, even on failure
    assert not (out / "train" / "manifest.json").exists()
    state = json.loads((out / "train" / "convert-state.json").read_text())
    assert 0 < len(state["shards"]) < 16

    again = convert_rec(src, out, shard_size=3, workers=workers, sets=[])
    assert again.shards_reused == len(state["shards"]) and again.shards_written > 0
    assert (out / "train" / "manifest.json").read_bytes() == (reference / "train" / "manifest.json").read_bytes()
    assert verify_shards(out).shards == 16
    assert not list((out / "train").glob(".*.tmp"))


def _with_split_record(src: Path, dst: Path) -> int:
    """Rewrite ``src`` with one image whose JPEG holds the RecordIO magic (4-byte aligned in the
    record) inside a COM segment, so the writer splits that record into parts."""
    from lresnet.convert.recordio import MAGIC, RecordReader, RecordWriter

    shutil.copytree(src, dst)
    with FacesEmore(src) as fe:
        target = fe.image_keys[3]
    magic = struct.pack("<I", MAGIC)
    with RecordReader(src / "train.rec", src / "train.idx") as reader, \
            RecordWriter(dst / "train.rec", dst / "train.idx") as writer:
        for key in reader.keys:
            record = reader.read(key)
            if key == target:
                head = 24 + 4 * struct.unpack_from("<I", record)[0]   # IRHeader + flag float labels
                filler = b"x" * (-(head + 6) % 4)                       # SOI + COM marker/length
                comment = b"\xff\xfe" + struct.pack(">H", 2 + len(filler) + 4 + 2) + filler + magic + b"yy"
                record = record[:head + 2] + comment + record[head + 2:]
                assert record.find(magic) % 4 == 0
            writer.write(key, record)
    return target


def test_split_records_and_multi_float_labels(tmp_path):
    src = tmp_path / "multi"
    synthesize(src, identities=4, images_per_id=3, pairs=0, seed=2, sets=(), label_format="multi",
               header_at="end")
    split_src = tmp_path / "split"
    target = _with_split_record(src, split_src)
    with open(split_src / "train.rec", "rb") as f:
        # header + 12 images + 4 identities = 17 records, one of them in 2 parts
        assert f.read().count(struct.pack("<I", 0xCED7230A)) == 17 + 1
    with FacesEmore(split_src) as fe:
        want = {k: fe.read_image(k) for k in fe.image_keys}
    assert want[target][1].count(struct.pack("<I", 0xCED7230A)) == 1
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        convert_rec(split_src, out, shard_size=5, workers=workers)
        got = {int(k): (int(cls), jpg) for k, jpg, cls in _read_train(out)}
        assert got == want


def test_mismatches_with_property_are_reported(src, tmp_path):
    """No header record (every image record is used), property says 10 classes, one 96x96 image."""
    import io

    from PIL import Image

    from lresnet.convert.recordio import IRHeader, RecordWriter, pack

    plain = tmp_path / "plain"
    plain.mkdir()
    odd = io.BytesIO()
    Image.new("RGB", (96, 96), (90, 120, 150)).save(odd, "JPEG")
    with FacesEmore(src) as fe:
        images = [fe.read_image(k) for k in fe.image_keys]
    with RecordWriter(plain / "train.rec", plain / "train.idx") as writer:
        for key, (label, jpeg) in enumerate(images):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), odd.getvalue() if key == 7 else jpeg))
    (plain / "property").write_text("10,112,112")
    summary = convert_rec(plain, tmp_path / "out", shard_size=16)
    assert summary.num_samples == 48 and summary.classes_with_images == 8
    assert summary.image_size_mismatches == 1
    assert any("says 10 classes, images found for 8" in w for w in summary.warnings)
    assert any("says images are 112x112, 1 images differ" in w for w in summary.warnings)


def test_two_conversions_never_write_one_folder(src, tmp_path):
    import fcntl

    (tmp_path / "train").mkdir()
    with open(tmp_path / "train" / ".convert.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another convert-rec is writing here"):
            convert_rec(src, tmp_path, shard_size=16, sets=[])
    assert convert_rec(src, tmp_path, shard_size=16, sets=[]).num_samples == 48


def test_without_idx_the_shards_are_the_same(converted, src, tmp_path):
    """No train.idx: the reader indexes train.rec by a scan; keys are record ordinals (as written)."""
    no_idx = tmp_path / "no_idx"
    shutil.copytree(src, no_idx)
    (no_idx / "train.idx").unlink()
    convert_rec(no_idx, tmp_path / "out", shard_size=10, seed=3, sets=[])
    want = [s["sha256"] for s in read_manifest(converted[0])["shards"]]
    assert [s["sha256"] for s in read_manifest(tmp_path / "out")["shards"]] == want


def test_plan_holds_only_keys():
    plan = shuffle_plan(range(10, 1010), seed=0)
    assert plan.dtype == np.int64 and sorted(plan.tolist()) == list(range(10, 1010))
    assert np.array_equal(plan, shuffle_plan(list(range(10, 1010)), seed=0))


def test_plan_order_is_stable_across_versions():
    """The in-place shuffle gives the order earlier versions wrote (keys[permutation(n)]):
    shards recorded by them stay resumable."""
    keys = np.arange(7, 5007, dtype=np.int64)
    expected = keys[np.random.Generator(np.random.PCG64(5)).permutation(keys.size)]
    assert np.array_equal(shuffle_plan(keys, seed=5), expected)
    assert np.array_equal(keys, np.arange(7, 5007))  # the caller's keys are left alone


def _mxnet_or_skip():
    from lresnet.convert.recordio import import_mxnet_recordio

    try:
        return import_mxnet_recordio()
    except InputError as err:  # not installed, or an MXNet that cannot import with this numpy
        pytest.skip(f"needs an importable mxnet ({err.message})")


@pytest.mark.parametrize("workers", [1, 2])
def test_mxnet_reader_writes_the_pure_readers_bytes(src, tmp_path, workers):
    """--reader mxnet reads every image record through MXIndexedRecordIO + mxnet.recordio.unpack: the
    shards, indexes, manifest and val sets are byte-identical to the pure reader's, also for split
    records, multi-float labels and a header written last."""
    _mxnet_or_skip()
    multi = tmp_path / "multi"
    synthesize(multi, identities=4, images_per_id=3, pairs=2, seed=2, sets=("lfw",), label_format="multi",
               header_at="end")
    _with_split_record(multi, tmp_path / "split")
    for name, folder in (("plain", src), ("split", tmp_path / "split")):
        pure = convert_rec(folder, tmp_path / f"{name}-pure", shard_size=5, seed=1, workers=workers)
        mx = convert_rec(folder, tmp_path / f"{name}-mxnet", shard_size=5, seed=1, workers=workers,
                         reader="mxnet")
        assert mx.num_samples == pure.num_samples > 0
        assert _tar_bytes(tmp_path / f"{name}-mxnet") == _tar_bytes(tmp_path / f"{name}-pure")


def test_mxnet_reader_reports_a_damaged_record_like_the_pure_reader(src, tmp_path):
    _mxnet_or_skip()
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    with FacesEmore(bad) as fe:
        key = fe.image_keys[3]
        offset = fe.reader.offset(key)
    with open(bad / "train.rec", "r+b") as f:
        f.seek(offset + 8 + 4)  # the IRHeader's label
        f.write(struct.pack("<f", 1000.0))
    for reader in ("pure", "mxnet"):
        with pytest.raises(InputError, match=rf"train\.rec: record {key}: label 1000 out of range"):
            convert_rec(bad, tmp_path / f"out-{reader}", shard_size=5, reader=reader)
        skipped = convert_rec(bad, tmp_path / f"skip-{reader}", shard_size=5, reader=reader, skip_corrupt=True)
        assert skipped.skipped_corrupt == 1 and skipped.num_samples == 47
    assert _tar_bytes(tmp_path / "skip-pure") == _tar_bytes(tmp_path / "skip-mxnet")
