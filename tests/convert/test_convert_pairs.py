"""Verification .bin files: Python 2/3 pickles load; anything else is refused and never runs."""

from __future__ import annotations

import os
import pickle
import pickletools

import pytest

from lresnet.core.errors import InputError
from lresnet.convert.pairs import PairBin, load_bin, write_bin

IMAGES = [b"\xff\xd8" + bytes([i]) * (50 + 300 * i) for i in range(4)]
ISSAME = [True, False]

# What Python 2.7's cPickle.dump((['ab', 'c'], [True]), f, 2) writes, byte for byte.
PY2_LITERAL = b"\x80\x02]q\x00(U\x02abq\x01U\x01cq\x02e]q\x03\x88a\x86q\x04."
# Python 2 protocol 0 (text) pickle of the same structure.
PY2_PROTOCOL0 = b"((lp0\nS'ab'\np1\naS'c'\np2\na(lp3\nI01\natp4\n."


def test_py2_literal_pickles_load_as_bytes(tmp_path):
    for i, data in enumerate((PY2_LITERAL, PY2_PROTOCOL0)):
        path = tmp_path / f"py2_{i}.bin"
        path.write_bytes(data)
        got = load_bin(path)
        assert got == PairBin([b"ab", b"c"], [True])
        assert isinstance(got.images[0], bytes) and got.issame[0] is True


def test_write_bin_protocol2_is_python2_style(tmp_path):
    path = tmp_path / "p2.bin"
    write_bin(path, IMAGES, ISSAME, protocol=2)
    data = path.read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= ops  # Python 2 str opcodes, short and long
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BINBYTES", "SHORT_BINBYTES"}
    assert load_bin(path) == PairBin(IMAGES, ISSAME)
    images, issame = pickle.loads(data, encoding="bytes")  # what InsightFace's loader does
    assert images == IMAGES and issame == ISSAME


def test_write_bin_literal_matches_python2(tmp_path):
    path = tmp_path / "lit.bin"
    write_bin(path, [b"ab", b"c"], [True], protocol=2)
    assert path.read_bytes() == PY2_LITERAL


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_py3_pickles(tmp_path, protocol):
    path = tmp_path / "p3.bin"
    write_bin(path, IMAGES, ISSAME, protocol=protocol)
    assert load_bin(path) == PairBin(IMAGES, ISSAME)


def test_py3_protocol2_codecs_spelling(tmp_path):
    # Python 3 pickles bytes under protocol 2 as _codecs.encode(str, 'latin1')
    path = tmp_path / "p3p2.bin"
    path.write_bytes(pickle.dumps((IMAGES, ISSAME), protocol=2))
    assert load_bin(path) == PairBin(IMAGES, ISSAME)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_System, _Eval])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_refused_and_not_run(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload(marker)], [True]), protocol=protocol))
    with pytest.raises(InputError, match=r"evil.bin: byte \d+: not a verification .bin: refused global"):
        load_bin(path)
    assert not marker.exists()


def test_codecs_encode_only_latin1_str(tmp_path):
    # _codecs.encode is admitted only as str -> latin1 bytes
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(InputError, match="only as encode"):
        load_bin(path)


@pytest.mark.parametrize("obj, message", [
    ({"a": 1}, "expected a pickled"),
    (([b"a", b"b"], [True, False]), "2 images for 2 pairs"),
    (([b"a", 3], [True]), "image 1 is int"),
    (([b"a", b"b"], ["yes"]), r"issame\[0\] is str"),
    ((b"ab", [True]), "expected \\(list of bytes, list of bool\\)"),
    (([b"a"], [True], 1), "expected a pickled"),
    (([], []), "holds no pairs"),
])
def test_wrong_structure(tmp_path, obj, message):
    path = tmp_path / "wrong.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(InputError, match=message):
        load_bin(path)


def test_truncated_and_garbage_and_missing(tmp_path):
    path = tmp_path / "cut.bin"
    write_bin(path, IMAGES, ISSAME, protocol=2)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match="cut.bin: byte \\d+: not a verification .bin"):
        load_bin(path)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="not a verification .bin"):
        load_bin(path)
    with pytest.raises(InputError, match="absent.bin: no such file"):
        load_bin(tmp_path / "absent.bin")


def test_write_bin_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "x.bin", IMAGES[:3], [True])
    with pytest.raises(ValueError, match="protocol"):
        write_bin(tmp_path / "x.bin", IMAGES, ISSAME, protocol=1)
