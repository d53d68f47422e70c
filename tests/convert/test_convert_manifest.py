"""Manifest reading: where it is found, what is refused, how settings differences are described."""

from __future__ import annotations

import pytest

from lresnet.core.errors import InputError
from lresnet.convert.manifest import describe_difference, manifest_path, read_manifest, write_json_atomic

GOOD = {"format": "lresnet-shards/1", "num_samples": 3, "num_classes": 2, "image_size": [112, 112],
        "seed": 0, "source": {"rec_bytes": 10},
        "shards": [{"name": "train-000000.tar", "count": 2, "bytes": 10240, "sha256": "a" * 64},
                   {"name": "train-000001.tar", "count": 1, "bytes": 10240, "sha256": "b" * 64}]}


def _write(folder, obj):
    (folder / "train").mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "train" / "manifest.json", obj)
    return folder / "train" / "manifest.json"


def test_found_from_out_dir_train_dir_or_file(tmp_path):
    path = _write(tmp_path, GOOD)
    for where in (tmp_path, tmp_path / "train", path):
        assert manifest_path(where) == path
        assert read_manifest(where) == GOOD
    assert not list((tmp_path / "train").glob(".*.tmp"))


@pytest.mark.parametrize("change, message", [
    ({"format": "webdataset"}, "format is 'webdataset'"),
    ({"num_samples": 4}, "num_samples differs"),
    ({"shards": [{"name": "x.tar"}]}, "'shards' must be a list"),
])
def test_refuses_malformed_manifests(tmp_path, change, message):
    path = _write(tmp_path, dict(GOOD, **change))
    with pytest.raises(InputError, match=message) as err:
        read_manifest(tmp_path)
    assert str(err.value).startswith(str(path))


def test_refuses_missing_fields_and_broken_json(tmp_path):
    bad = dict(GOOD)
    del bad["num_classes"]
    _write(tmp_path, bad)
    with pytest.raises(InputError, match="missing field 'num_classes'"):
        read_manifest(tmp_path)
    (tmp_path / "train" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read JSON"):
        read_manifest(tmp_path)
    with pytest.raises(InputError, match="file not found"):
        read_manifest(tmp_path / "nothing.json")


def test_describe_difference_names_each_setting():
    old = {"seed": 0, "shuffle": True, "shard_size": 10, "key_digits": 9, "source": {"rec_bytes": 1}}
    new = dict(old, seed=1, source={"rec_bytes": 2})
    assert describe_difference(old, new) == "seed 0 -> 1, source.rec_bytes 1 -> 2"


@pytest.mark.parametrize("name", ["../../etc/passwd", "sub/train-000000.tar", "/abs/train-000000.tar", "..", ".", "",
                                  "a\\b.tar", 7])
def test_refuses_shard_names_that_are_not_plain_file_names(tmp_path, name):
    shards = [dict(GOOD["shards"][0]), GOOD["shards"][1]]
    shards[0]["name"] = name
    path = _write(tmp_path, dict(GOOD, shards=shards))
    with pytest.raises(InputError) as err:
        read_manifest(tmp_path)
    assert str(err.value).startswith(f"{path}: shards[0]: shard name {name!r} is not a plain file name")


@pytest.mark.parametrize("classes", [-5, 0, 2.5, "3", True, None])
def test_refuses_a_class_count_below_one_or_not_an_integer(tmp_path, classes):
    path = _write(tmp_path, dict(GOOD, num_classes=classes))
    with pytest.raises(InputError, match=rf"num_classes is {classes!r}, expected an integer >= 1") as err:
        read_manifest(tmp_path)
    assert str(err.value).startswith(str(path))


def test_training_source_with_an_escaping_shard_name_is_refused(tmp_path):
    from lresnet.pipeline import resolve_source

    shards = [dict(GOOD["shards"][0], name="../../etc/passwd"), GOOD["shards"][1]]
    path = _write(tmp_path, dict(GOOD, shards=shards))
    with pytest.raises(InputError, match="not a plain file name") as err:
        resolve_source(tmp_path)
    assert str(err.value).startswith(str(path))
