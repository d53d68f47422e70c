"""The shard tar module: the direct ustar writer (readable by GNU tar, tarfile and webdataset; DALI
index; atomicity) and the one fast reader (against the standard library's writer, GNU tar and webdataset)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from lresnet.core.errors import InputError
from lresnet.convert.shards import (
    TarReadError,
    TarShardWriter,
    file_sha256,
    iter_members,
    pack_jpg_cls,
    read_dali_index,
    read_samples,
    read_shard,
    remove_stale_temp_files,
    split_member_name,
    ustar_header,
)

SAMPLES = [
    (f"{k:09d}", [("jpg", os.urandom(n)), ("cls", str(k % 7).encode())])
    for k, n in enumerate([0, 1, 511, 512, 513, 7000, 10240, 3])
]


def _write(tmp_path, samples=SAMPLES, index=True):
    path = tmp_path / "s.tar"
    with TarShardWriter(path, tmp_path / "s.idx" if index else None, buffer_size=4096) as w:
        for key, members in samples:
            w.write_sample(key, members)
    return path


def test_header_matches_tarfile_checksum_rules():
    header = ustar_header(b"000000001.jpg", 12345)
    info = tarfile.TarInfo.frombuf(header, "ascii", "strict")  # raises on a bad checksum
    assert (info.name, info.size, info.type, info.mode) == ("000000001.jpg", 12345, tarfile.REGTYPE, 0o644)
    assert len(header) == 512
    with pytest.raises(ValueError):
        ustar_header(b"x" * 101, 1)


def test_tarfile_reads_members_and_bytes(tmp_path):
    path = _write(tmp_path)
    with tarfile.open(path) as tf:
        got = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    want = [(f"{k}.{ext}", data) for k, members in SAMPLES for ext, data in members]
    assert got == want
    assert path.stat().st_size % 10240 == 0


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_lists_and_extracts(tmp_path):
    path = _write(tmp_path)
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [f"{k}.{ext}" for k, m in SAMPLES for ext, _ in m]
    assert listing.stderr == ""
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True)
    for key, members in SAMPLES:
        for ext, data in members:
            assert (out / f"{key}.{ext}").read_bytes() == data


def test_webdataset_reads_every_sample(tmp_path):
    import webdataset as wds

    path = _write(tmp_path)
    got = [(s["__key__"], s["jpg"], s["cls"]) for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert got == [(k, m[0][1], m[1][1]) for k, m in SAMPLES]


def test_dali_index_matches_tar_offsets(tmp_path):
    """The .idx equals what DALI's wds2idx derives: per sample `ext offset size name`, data offsets."""
    path = _write(tmp_path)
    lines, last = [], None
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = split_member_name(m.name)
            entry = f"{ext} {m.offset_data} {m.size} {m.name}"
            if key == last:
                lines[-1] += " " + entry
            else:
                lines.append(entry)
                last = key
    expected = f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)
    assert (tmp_path / "s.idx").read_text() == expected
    parsed = read_dali_index(tmp_path / "s.idx")
    raw = path.read_bytes()
    for (key, members), sample in zip(SAMPLES, parsed):
        for (ext, data), (iext, off, size, name) in zip(members, sample):
            assert (iext, name) == (ext, f"{key}.{ext}")
            assert off % 512 == 0 and raw[off:off + size] == data


def test_multi_dot_extensions_group_into_one_sample(tmp_path):
    with TarShardWriter(tmp_path / "v.tar", tmp_path / "v.idx") as w:
        w.write_sample("000000", [("a.jpg", b"A"), ("b.jpg", b"BB"), ("same", b"1")])
        w.write_sample("000001", [("a.jpg", b"C"), ("b.jpg", b"DD"), ("same", b"0")])
    parsed = read_dali_index(tmp_path / "v.idx")
    assert [[c[0] for c in s] for s in parsed] == [["a.jpg", "b.jpg", "same"]] * 2


def test_close_reports_sha256_and_size(tmp_path):
    w = TarShardWriter(tmp_path / "s.tar")
    for key, members in SAMPLES:
        w.write_sample(key, members)
    info = w.close()
    data = (tmp_path / "s.tar").read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest() == file_sha256(tmp_path / "s.tar")
    assert (info.name, info.count, info.bytes) == ("s.tar", len(SAMPLES), len(data))


def test_output_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert _write(a).read_bytes() == _write(b).read_bytes()


def test_nothing_appears_until_closed_and_abort_leaves_nothing(tmp_path):
    path = tmp_path / "s.tar"
    w = TarShardWriter(path, tmp_path / "s.idx")
    w.add("000.jpg", b"x" * 5000)
    assert not path.exists() and not (tmp_path / "s.idx").exists()
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".s.tar.")
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with TarShardWriter(path) as w2:
            w2.add("000.jpg", b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_abort_keeps_an_earlier_complete_file(tmp_path):
    path = _write(tmp_path, index=False)
    before = path.read_bytes()
    w = TarShardWriter(path)
    w.add("zzz.jpg", b"other")
    w.abort()
    assert path.read_bytes() == before


def test_iter_members_reads_headers_and_flags_damage(tmp_path):
    path = _write(tmp_path)
    members = list(iter_members(path, with_data=(".cls",)))
    with tarfile.open(path) as tf:
        assert [m[:3] for m in members] == [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
    assert [m[3] for m in members if m[0].endswith(".cls")] == [m[1][1] for _, m in SAMPLES]
    assert all(m[3] is None for m in members if m[0].endswith(".jpg"))
    assert [m[3] for m in iter_members(path, with_data=True)] == [d for _, m in SAMPLES for _, d in m]
    raw = bytearray(path.read_bytes())
    raw[512 * 3 + 5] ^= 0xFF  # inside the second member's header
    damaged = tmp_path / "bad.tar"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"bad\.tar: offset 1536, key 000000000: tar header checksum mismatch"):
        list(iter_members(damaged))
    jpg = next(m for m in members if m[0] == "000000005.jpg")  # 7000 bytes, seeked over
    truncated = tmp_path / "short.tar"
    truncated.write_bytes(path.read_bytes()[:jpg[1] + 100])
    with pytest.raises(InputError, match=rf"short\.tar: offset {jpg[1]}, key 000000005: tar member "
                                         r"000000005\.jpg cut short"):
        list(iter_members(truncated, with_data=(".cls",)))
    with pytest.raises(InputError, match="nowhere.tar: cannot read"):
        list(iter_members(tmp_path / "nowhere.tar"))


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".train-000001.tar.{dead.pid}.tmp").write_bytes(b"partial")
    (tmp_path / f".train-000002.tar.{os.getpid()}.tmp").write_bytes(b"mine")
    (tmp_path / "train-000000.tar").write_bytes(b"complete")
    assert remove_stale_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]


def test_add_pair_writes_the_same_bytes_as_two_adds(tmp_path):
    a = TarShardWriter(tmp_path / "a.tar", tmp_path / "a.idx")
    b = TarShardWriter(tmp_path / "b.tar", tmp_path / "b.idx")
    for k in range(40):
        data = os.urandom(k * 211 % 3000)
        a.add_pair(f"{k:09d}", "jpg", data, "cls", str(k).encode())
        b.add(f"{k:09d}.jpg", data)
        b.add(f"{k:09d}.cls", str(k).encode())
    assert a.close().sha256 == b.close().sha256
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_dali_index_matches_gnu_tar_block_numbers(tmp_path):
    """What wds2idx derives from `tar --list --block-num` and `tar -tv` (header block + 1 = data)."""
    path = _write(tmp_path)
    blocks = subprocess.run(["tar", "--list", "--block-num", "-f", str(path)], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    sizes = subprocess.run(["tar", "-tvf", str(path)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    members = []
    for block_line, size_line in zip(blocks, sizes):
        block, name = block_line.split(": ", 1)
        members.append((name, (int(block.split()[1]) + 1) * 512, int(size_line.split()[2])))
    flat = [c for sample in read_dali_index(tmp_path / "s.idx") for c in sample]
    assert [(c[3], c[1], c[2]) for c in flat] == members


@pytest.mark.parametrize("count", [0, 1, 40])
def test_packed_batches_are_byte_identical_to_add_pair(tmp_path, count):
    """The converter's batch packer writes what add_pair writes, also into a dirty buffer."""
    rng = np.random.default_rng(count)
    datas = [os.urandom(n) for n in rng.choice([0, 1, 511, 512, 513, 6400, 10240], count)]
    keys = rng.choice(10 ** 9, count, replace=False).astype(np.int64)
    labels = rng.choice([0, 9, 10, 99, 100, 85741, 10 ** 12], count).astype(np.int64)
    src = b"junk" + b"".join(datas)
    sizes = np.array([len(d) for d in datas], dtype=np.int64)
    starts = 4 + np.cumsum(sizes) - sizes
    with TarShardWriter(tmp_path / "a.tar", tmp_path / "a.idx") as w:
        for k, label, d in zip(keys.tolist(), labels.tolist(), datas):
            w.add_pair(str(k).zfill(9), "jpg", d, "cls", str(label).encode())
    for out in (None, np.full(1 << 20, 0xAA, dtype=np.uint8)):
        with TarShardWriter(tmp_path / "b.tar", tmp_path / "b.idx") as w:
            for lo, hi in ((0, count // 3), (count // 3, count)):  # two batches
                part = slice(lo, hi)
                data, index = pack_jpg_cls(keys[part], 9, labels[part], src, starts[part], sizes[part],
                                           w.tell(), out)
                w.add_packed(data, index, hi - lo)
            info = w.close()
        assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()
        assert (tmp_path / "b.idx").read_bytes() == (tmp_path / "a.idx").read_bytes()
        assert info.sha256 == file_sha256(tmp_path / "a.tar") and info.count == count
    with pytest.raises(ValueError, match=r"keys in \[0, 10\*\*9\)"):
        pack_jpg_cls(np.array([10 ** 9]), 9, np.array([0]), b"x", np.array([0]), np.array([1]))
    assert not list(tmp_path.glob(".*.tmp"))


def test_ustar_prefix_holds_names_up_to_256_bytes():
    name = b"d" * 150 + b"/" + b"e" * 90 + b"/k.a.jpg"
    info = tarfile.TarInfo.frombuf(ustar_header(name, 7), "ascii", "strict")  # raises on a bad checksum
    assert (info.name, info.size) == (name.decode(), 7)
    for bad in (b"x" * 101, b"d" * 156 + b"/k.jpg", b"d" * 10 + b"/" + b"e" * 101):
        with pytest.raises(ValueError, match="does not fit"):
            ustar_header(bad, 1)


# --------------------------------------------------------------------------- the reader
def _tar(members, fmt=tarfile.USTAR_FORMAT, with_dir=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if with_dir:
            info = tarfile.TarInfo("sub")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [(f"{i:06d}.{ext}", (bytes([i]) * (300 + 97 * i) if ext == "jpg" else str(i).encode()))
           for i in range(6) for ext in ("jpg", "cls")]


def test_reads_what_tarfile_wrote():
    samples = list(read_samples(io.BytesIO(_tar(MEMBERS))))
    assert [k for k, _ in samples] == [f"{i:06d}" for i in range(6)]
    assert all(parts["cls"] == str(i).encode() and parts["jpg"] == bytes([i]) * (300 + 97 * i)
               for i, (_, parts) in enumerate(samples))


@pytest.mark.parametrize("seekable", [True, False])
def test_skip_and_limit(seekable):
    data = _tar(MEMBERS)

    class Pipe(io.BytesIO):
        def seekable(self):
            return seekable

    samples = list(read_samples(Pipe(data), skip=2, limit=3))
    assert [k for k, _ in samples] == ["000002", "000003", "000004"]
    assert samples[0][1]["jpg"] == bytes([2]) * 494


def test_select_passes_over_payloads_and_members_lists_them():
    data = _tar(MEMBERS)
    layout = []
    samples = list(read_samples(io.BytesIO(data), select=lambda name: name.endswith(".cls"), members=layout))
    assert samples == [(f"{i:06d}", {"cls": str(i).encode()}) for i in range(6)]
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert layout == [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
    cut = layout[-2][1] + 10  # inside 000005.jpg
    with pytest.raises(TarReadError, match="000005.jpg cut short"):  # a seek past the end is noticed
        list(read_samples(io.BytesIO(data[:cut]), select=lambda name: False, size_hint=cut))


def test_truncated_member_raises_with_place():
    data = _tar(MEMBERS)
    with pytest.raises(TarReadError) as err:
        list(read_samples(io.BytesIO(data[:3000])))  # in the padding after 000001.jpg (2560..2957)
    assert err.value.key == "000001" and err.value.where == "offset 2560, key 000001"


def test_garbled_header_raises():
    data = bytearray(_tar(MEMBERS))
    data[1024 + 5] ^= 0xFF  # inside the second member's header (the first payload is 512 bytes)
    with pytest.raises(TarReadError, match="checksum"):
        list(read_samples(io.BytesIO(bytes(data))))


def test_a_repeated_member_in_a_sample_raises_as_webdataset_does():
    data = _tar(MEMBERS[:2] + [("000000.cls", b"9")])
    with pytest.raises(TarReadError, match="duplicate member 000000.cls") as err:
        list(read_samples(io.BytesIO(data)))
    assert err.value.key == "000000"


def test_read_shard_names_the_file(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match=r"junk\.tar: offset 0: tar header checksum mismatch"):
        list(read_shard(tmp_path / "junk.tar"))


# --------------------------------------------------------------------------- one format, four readers
PREFIX_DIR = "d" * 120 + "/"  # over 100 bytes with the file name: ustar's prefix field
LONG_DIR = "d" * 150 + "/" + "e" * 150 + "/"  # over 256 bytes: pax or GNU long-name headers
BASIC = [("000001.jpg", b"\xff\xd8" + bytes(600)), ("000001.cls", b"17"),
         ("000002.a.jpg", b"A" * 513), ("000002.b.jpg", b"B" * 511), ("000002.same", b"1")]


def _with_dir(folder):
    return [(folder + "000003.a.jpg", b"a" * 700), (folder + "000003.b.jpg", b"b"), (folder + "000003.same", b"0"),
            (folder + "000004.jpg", b"j" * 1024), (folder + "000004.cls", b"5")]


def _writer_tar(path, members):
    with TarShardWriter(path) as w:
        for name, data in members:
            w.add(name, data)


def _tarfile_tar(fmt):
    def write(path, members):
        path.write_bytes(_tar(members, fmt, with_dir=True))
    return write


def _grouped(members):
    samples = []
    for name, data in members:
        key, ext = split_member_name(name)
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = data
    return samples


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("writer,folder", [(_writer_tar, PREFIX_DIR), (_tarfile_tar(tarfile.USTAR_FORMAT), PREFIX_DIR),
                                           (_tarfile_tar(tarfile.PAX_FORMAT), LONG_DIR),
                                           (_tarfile_tar(tarfile.GNU_FORMAT), LONG_DIR)],
                         ids=["writer-ustar-prefix", "tarfile-ustar-prefix", "tarfile-pax", "tarfile-gnu"])
def test_reader_gnu_tar_and_webdataset_agree(tmp_path, writer, folder):
    """Keys and payloads, multi-dot extensions and long names: the same samples whoever reads."""
    import webdataset as wds

    members = BASIC + _with_dir(folder)
    path = tmp_path / "s.tar"
    writer(path, members)
    want = _grouped(members)
    assert [s[0] for s in want] == ["000001", "000002", folder + "000003", folder + "000004"]

    with open(path, "rb") as stream:
        assert list(read_samples(stream)) == want

    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    names = [n for n in listing.stdout.splitlines() if not n.endswith("/") and n != "sub"]
    assert listing.stderr == "" and names == [n for n, _ in members]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True)
    assert _grouped((n, (out / n).read_bytes()) for n in names) == want

    got = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
           for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert got == want
