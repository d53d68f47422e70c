"""RecordIO: byte layout, split records, random/sequential reads, faces_emore, bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lresnet.core.errors import InputError
from lresnet.convert.recordio import (MAGIC, FacesEmore, IRHeader, RecordReader, RecordWriter,
                                      encode_record, jpeg_size, pack, unpack)

M = struct.pack("<I", MAGIC)


def lrec(cflag: int, length: int) -> bytes:
    return M + struct.pack("<I", (cflag << 29) | length)


# -- IRHeader -------------------------------------------------------------------------------------
def test_pack_scalar_label_layout():
    assert pack(IRHeader(0, 3.0, 7, 9), b"jpg") == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"jpg"


def test_pack_multi_label_layout_and_unpack():
    buf = pack(IRHeader(2, (5.0, 0.25), 1, 0), b"xyz")
    assert buf == struct.pack("<IfQQ", 2, 0.0, 1, 0) + struct.pack("<2f", 5.0, 0.25) + b"xyz"
    header, payload = unpack(buf)
    assert header == IRHeader(2, (5.0, 0.25), 1, 0) and payload == b"xyz"


def test_unpack_scalar_roundtrip():
    header, payload = unpack(pack(IRHeader(0, 12.0, 3, 0), b"\xff\xd8abc"))
    assert header == IRHeader(0, 12.0, 3, 0) and payload == b"\xff\xd8abc"


def test_unpack_short_record_names_place():
    with pytest.raises(InputError, match="f.rec: record 4: .*shorter than an IRHeader"):
        unpack(b"abc", "f.rec", "record 4")
    with pytest.raises(InputError, match="flag 3 announces 3 float labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8, "f.rec", "record 1")


# -- byte layout of the writer ------------------------------------------------------------------
def test_encode_plain_record_padded():
    assert encode_record(b"abcde") == lrec(0, 5) + b"abcde" + b"\0\0\0"
    assert encode_record(b"abcd") == lrec(0, 4) + b"abcd"
    assert encode_record(b"") == lrec(0, 0)


def test_encode_splits_on_aligned_magic():
    assert encode_record(b"abcd" + M + b"ef") == lrec(1, 4) + b"abcd" + lrec(3, 2) + b"ef\0\0"
    assert encode_record(M + b"x") == lrec(1, 0) + lrec(3, 1) + b"x\0\0\0"
    assert encode_record(b"abcd" + M + M + b"wxyz") == (
        lrec(1, 4) + b"abcd" + lrec(2, 0) + lrec(3, 4) + b"wxyz")
    assert encode_record(b"abcd" + M) == lrec(1, 4) + b"abcd" + lrec(3, 0)


def test_encode_keeps_unaligned_magic():
    rec = b"a" + M + b"bcd"
    assert encode_record(rec) == lrec(0, 8) + rec
    # an unaligned hit overlapping an aligned one must not hide the aligned one
    rec2 = b"ab" + M[:2] + M + b"zz"
    assert encode_record(rec2) == lrec(1, 4) + b"ab" + M[:2] + lrec(3, 2) + b"zz\0\0"


RECORDS = [b"abc", M, b"xxxx" + M + b"yy", b"x" + M + b"abc", b"", b"1234" * 3 + M + M + b"z",
           bytes(range(256)) * 3]


def write(tmp_path: Path, records, keys=None, idx=True):
    rec, idx_path = tmp_path / "t.rec", tmp_path / "t.idx"
    offsets = []
    with RecordWriter(rec, idx_path if idx else None) as w:
        for i, r in enumerate(records):
            offsets.append(w.write(i if keys is None else keys[i], r))
    return rec, idx_path, offsets


def test_writer_file_is_concatenated_encodings_and_idx(tmp_path):
    rec, idx, offsets = write(tmp_path, RECORDS)
    data = rec.read_bytes()
    expected = b"".join(encode_record(r) for r in RECORDS)
    assert data == expected
    lines = idx.read_text().splitlines()
    assert lines == [f"{i}\t{o}" for i, o in enumerate(offsets)]
    assert offsets[0] == 0 and offsets[1] == 12 and offsets[2] == 28


def test_roundtrip_random_access_and_scan(tmp_path):
    rec, idx, offsets = write(tmp_path, RECORDS)
    with RecordReader(rec, idx) as r:
        assert r.keys == list(range(len(RECORDS)))
        assert [r.read(k) for k in reversed(r.keys)] == RECORDS[::-1]
        assert [r.read_at(o) for o in offsets] == RECORDS
        assert list(r.scan()) == list(zip(offsets, RECORDS))
        assert int(r.spans().sum()) == rec.stat().st_size


def test_no_idx_sequential_scan_joins_split_records(tmp_path):
    rec, _, offsets = write(tmp_path, RECORDS, idx=False)
    r = RecordReader(rec)
    assert r.keys == list(range(len(RECORDS)))
    assert [r.read(k) for k in r.keys] == RECORDS
    assert [r.offset(k) for k in r.keys] == offsets
    assert [r.span(k) for k in r.keys] == [len(encode_record(x)) for x in RECORDS]


def test_sparse_unordered_keys(tmp_path):
    keys = [50, 7, 1000, 3, 4, 5, 6]
    rec, idx, _ = write(tmp_path, RECORDS, keys=keys)
    r = RecordReader(rec, idx)
    assert r.keys == sorted(keys)
    for k, data in zip(keys, RECORDS):
        assert r.read(k) == data
    with pytest.raises(InputError, match="t.idx: no record with key 8"):
        r.read(8)
    assert r.key_range is None and r.key_array.tolist() == sorted(keys) and len(r) == len(keys)


def test_reader_pickles_without_handle(tmp_path):
    import pickle

    rec, idx, _ = write(tmp_path, RECORDS)
    r = RecordReader(rec, idx)
    r.read(1)
    clone = pickle.loads(pickle.dumps(r))
    assert clone.read(2) == RECORDS[2]


# -- bad input ----------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    with pytest.raises(InputError, match="nope.rec: no such file"):
        RecordReader(tmp_path / "nope.rec")
    rec, _, _ = write(tmp_path, RECORDS, idx=False)
    with pytest.raises(InputError, match="missing.idx: no such file"):
        RecordReader(rec, tmp_path / "missing.idx")


def test_truncated_rec(tmp_path):
    rec, idx, offsets = write(tmp_path, RECORDS)
    size = rec.stat().st_size
    rec.write_bytes(rec.read_bytes()[: size - 10])
    last = len(RECORDS) - 1
    r = RecordReader(rec, idx)
    with pytest.raises(InputError) as err:
        r.read(last)
    assert str(rec) in str(err.value) and f"record {last} at offset {offsets[last]}" in str(err.value)
    assert "truncated" in str(err.value)
    with pytest.raises(InputError, match=f"truncated.*offset {offsets[last]}"):
        list(r.scan())
    with pytest.raises(InputError, match=f"record {last} at offset {offsets[last]}: truncated"):
        RecordReader(rec).keys


def test_truncated_inside_part_header(tmp_path):
    rec, _, offsets = write(tmp_path, RECORDS, idx=False)
    rec.write_bytes(rec.read_bytes() + M[:3])
    with pytest.raises(InputError, match="truncated record header"):
        RecordReader(rec).keys


def test_bad_magic(tmp_path):
    rec, idx, offsets = write(tmp_path, RECORDS)
    data = bytearray(rec.read_bytes())
    data[offsets[2]] ^= 0xFF
    rec.write_bytes(bytes(data))
    r = RecordReader(rec, idx)
    assert r.read(1) == RECORDS[1]
    with pytest.raises(InputError, match=f"t.rec: record 2 at offset {offsets[2]}: bad magic"):
        r.read(2)
    with pytest.raises(InputError, match=f"offset {offsets[2]}: bad magic"):
        list(r.scan())


def test_idx_offset_past_end(tmp_path):
    rec, idx, _ = write(tmp_path, RECORDS)
    idx.write_text(idx.read_text() + f"99\t{rec.stat().st_size + 100}\n")
    with pytest.raises(InputError, match=r"t.idx: line 8: offset \d+ of record 99 is past the end"):
        RecordReader(rec, idx)


def test_idx_malformed_line_and_duplicate(tmp_path):
    rec, idx, _ = write(tmp_path, RECORDS)
    idx.write_text("0\t0\nnot a line\n")
    with pytest.raises(InputError, match="t.idx: line 2: expected 'key<TAB>offset'"):
        RecordReader(rec, idx)
    idx.write_text("0\t0\n0\t12\n")
    with pytest.raises(InputError, match="duplicate key 0"):
        RecordReader(rec, idx)
    idx.write_text("0\t0\t12\n1\n")
    with pytest.raises(InputError, match="t.idx: line 1: expected"):
        RecordReader(rec, idx)


def test_idx_loose_formatting_still_reads(tmp_path):
    rec, idx, offsets = write(tmp_path, RECORDS)
    idx.write_text("\r\n".join(f"{i} {o}" for i, o in enumerate(offsets)) + "\r\n\r\n")
    r = RecordReader(rec, idx)
    assert [r.read(k) for k in r.keys] == RECORDS


@pytest.mark.parametrize("chunk", [5, 7, 64])
def test_idx_is_parsed_in_chunks(tmp_path, monkeypatch, chunk):
    """Lines cut across chunk boundaries parse the same; errors keep their line numbers."""
    monkeypatch.setattr(RecordReader, "_IDX_CHUNK", chunk)
    keys = [50, 7, 1000, 3, 4, 5, 6]
    rec, idx, offsets = write(tmp_path, RECORDS, keys=keys)
    r = RecordReader(rec, idx)
    assert r.keys == sorted(keys) and isinstance(r.key_array, np.ndarray)
    assert [r.read(k) for k in keys] == RECORDS
    found, offs, spans = r.locate(np.array([1000, 8, 3], dtype=np.int64))
    assert found.tolist() == [True, False, True]
    assert offs.tolist() == [r.offset(1000), 0, r.offset(3)]
    assert spans.tolist() == [r.span(1000), 0, r.span(3)]
    idx.write_text(idx.read_text() + "8\t0\nbad line\n9\t0\n")
    with pytest.raises(InputError, match="t.idx: line 9: expected 'key<TAB>offset'"):
        RecordReader(rec, idx)
    idx.write_text("\r".join(f"{i} {o}" for i, o in enumerate(offsets)))  # CR line ends, no NL
    assert RecordReader(rec, idx).keys == list(range(len(RECORDS)))


def test_read_at_past_end_and_continuation_start(tmp_path):
    rec, idx, offsets = write(tmp_path, RECORDS)
    r = RecordReader(rec, idx)
    with pytest.raises(InputError, match="past the end"):
        r.read_at(rec.stat().st_size + 4)
    # the second part of record 2 starts with a cflag-3 header: not a record start
    with pytest.raises(InputError, match="continuation part"):
        r.read_at(offsets[2] + 12)


# -- faces_emore --------------------------------------------------------------------------------
def fake_jpeg(tag: int) -> bytes:
    return b"\xff\xd8" + bytes([tag]) * 37 + b"\xff\xd9"


def build_emore(root: Path, classes=3, per_class=2, header_key="start", multi=False, label_shift=0,
                prop=None, idx=True):
    """A faces_emore folder built record by record (fake JPEG payloads)."""
    root.mkdir(parents=True, exist_ok=True)
    n = classes * per_class
    first_img = 1 if header_key == "start" else 0
    first_id = first_img + n
    header = pack(IRHeader(2, (float(first_id), float(first_id + classes)), 0, 0), b"")
    images = {}
    with RecordWriter(root / "train.rec", root / "train.idx" if idx else None) as w:
        if header_key == "start":
            w.write(0, header)
        for i in range(n):
            key = first_img + i
            cls = i // per_class + label_shift
            label = (float(cls), 7.5, 1.0) if multi else float(cls)
            images[key] = (cls, fake_jpeg(i))
            w.write(key, pack(IRHeader(0, label, key, 0), images[key][1]))
        for c in range(classes):
            lo = first_img + c * per_class
            w.write(first_id + c, pack(IRHeader(2, (float(lo), float(lo + per_class)), 0, 0), b""))
        if header_key == "end":
            w.write(first_id + classes, header)
    (root / "property").write_text(prop if prop is not None else f"{classes},112,112\n")
    return images


@pytest.mark.parametrize("header_key", ["start", "end"])
@pytest.mark.parametrize("multi", [False, True])
def test_faces_emore_header_lookup_and_labels(tmp_path, header_key, multi):
    images = build_emore(tmp_path / "e", header_key=header_key, multi=multi)
    with FacesEmore(tmp_path / "e") as fe:
        assert fe.num_classes == 3 and fe.image_size == (112, 112)
        assert fe.image_keys == sorted(images)
        assert fe.header_key == (0 if header_key == "start" else 9)
        assert len(fe.identity_keys) == 3
        for key, (cls, jpeg) in images.items():
            assert fe.read_image(key) == (cls, jpeg)
        # consecutive keys: kept as ranges, no per-record key arrays
        assert fe.reader.key_range == range(0, 10) and fe.image_key_range == range(min(images), max(images) + 1)
        assert fe.image_key_array.tolist() == sorted(images) and fe.num_images == len(images)


def test_faces_emore_without_idx_scans(tmp_path):
    images = build_emore(tmp_path / "e", idx=False)
    fe = FacesEmore(tmp_path / "e")
    assert fe.idx_path is None and fe.image_keys == sorted(images)
    assert fe.read_image(3) == images[3]


def test_faces_emore_without_header_falls_back(tmp_path):
    root = tmp_path / "e"
    root.mkdir()
    with RecordWriter(root / "train.rec", root / "train.idx") as w:
        for i in range(4):
            w.write(i, pack(IRHeader(0, float(i % 2), i, 0), fake_jpeg(i)))
    (root / "property").write_text("2,112,112")
    fe = FacesEmore(root)
    assert fe.header_key is None and fe.image_keys == [0, 1, 2, 3]
    assert fe.read_image(3) == (1, fake_jpeg(3))


def test_faces_emore_label_out_of_range(tmp_path):
    build_emore(tmp_path / "e", label_shift=1)
    fe = FacesEmore(tmp_path / "e")
    with pytest.raises(InputError, match=r"train.rec: record 5: label 3 out of range \[0, 3\)"):
        fe.read_image(5)


def test_faces_emore_property_mismatch_and_missing(tmp_path):
    build_emore(tmp_path / "e", prop="4,112,112")
    with pytest.raises(InputError, match="property: property says 4 classes but the header record"):
        FacesEmore(tmp_path / "e")
    build_emore(tmp_path / "f", prop="abc")
    with pytest.raises(InputError, match="f/property: expected 'classes,height,width'"):
        FacesEmore(tmp_path / "f")
    (tmp_path / "f" / "property").unlink()
    with pytest.raises(InputError, match="f/property: no such file"):
        FacesEmore(tmp_path / "f")
    build_emore(tmp_path / "g")
    (tmp_path / "g" / "train.rec").unlink()
    with pytest.raises(InputError, match="g/train.rec: no such file"):
        FacesEmore(tmp_path / "g")
    with pytest.raises(InputError, match="no such directory"):
        FacesEmore(tmp_path / "nothing")


def test_faces_emore_image_size_mismatch(tmp_path):
    import simplejpeg

    root = tmp_path / "e"
    build_emore(root, classes=1, per_class=1)
    jpeg = simplejpeg.encode_jpeg(np.zeros((96, 80, 3), np.uint8), quality=90, colorspace="RGB")
    assert jpeg_size(jpeg) == (96, 80)
    with RecordWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, (2.0, 3.0), 0, 0), b""))
        w.write(1, pack(IRHeader(0, 0.0, 1, 0), jpeg))
        w.write(2, pack(IRHeader(2, (1.0, 2.0), 0, 0), b""))
    with pytest.raises(InputError, match="property says 112x112 images but record 1 of train.rec is 96x80"):
        FacesEmore(root)


def test_faces_emore_non_jpeg_and_bin_files(tmp_path):
    root = tmp_path / "e"
    build_emore(root)
    (root / "lfw.bin").write_bytes(b"x")
    (root / "cfp_fp.bin").write_bytes(b"x")
    fe = FacesEmore(root)
    assert list(fe.bin_files()) == ["cfp_fp", "lfw"]
    with pytest.raises(InputError, match="record 0: the faces_emore header, not an image"):
        fe.read_image(0)
    with pytest.raises(InputError, match="record 8: an identity record, not an image"):
        fe.read_image(8)
    with pytest.raises(InputError, match="record 2: image payload is not a JPEG"):
        fe.decode_image_record(2, pack(IRHeader(0, 1.0, 2, 0), b"GIF89a"))
