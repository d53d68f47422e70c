"""The direct tar reader against the standard library's writer."""

from __future__ import annotations

import io
import tarfile

import pytest

from lresnet.pipeline.tario import TarReadError, read_samples


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


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_pax_gnu_and_ustar_prefix_headers(fmt):
    long_dir = "d" * 120 + "/"
    members = [(long_dir + "k1.a.jpg", b"A"), (long_dir + "k1.same", b"1"), (long_dir + "k2.a.jpg", b"B")]
    samples = list(read_samples(io.BytesIO(_tar(members, fmt, with_dir=True))))
    assert [(k, sorted(p)) for k, p in samples] == [(long_dir + "k1", ["a.jpg", "same"]), (long_dir + "k2", ["a.jpg"])]


@pytest.mark.parametrize("seekable", [True, False])
def test_skip_and_limit(seekable):
    data = _tar(MEMBERS)

    class Pipe(io.BytesIO):
        def seekable(self):
            return seekable

    samples = list(read_samples(Pipe(data), skip=2, limit=3))
    assert [k for k, _ in samples] == ["000002", "000003", "000004"]
    assert samples[0][1]["jpg"] == bytes([2]) * 494


def test_truncated_member_raises_with_place():
    data = _tar(MEMBERS)
    with pytest.raises(TarReadError) as err:
        list(read_samples(io.BytesIO(data[:3000])))
    assert err.value.key is not None and "offset" in err.value.where


def test_garbled_header_raises():
    data = bytearray(_tar(MEMBERS))
    data[1024 + 5] ^= 0xFF  # inside the second member's header (the first payload is 512 bytes)
    with pytest.raises(TarReadError, match="checksum"):
        list(read_samples(io.BytesIO(bytes(data))))
