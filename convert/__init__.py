"""faces_emore (MXNet RecordIO + ``.bin``) -> webdataset shards, and the readers behind it.

Public API of the writing side::

    convert_rec(src_dir, out_dir, shard_size=10000, workers=1, seed=0, shuffle=True,
                sets=None, skip_corrupt=False, progress=None) -> ConvertSummary
    read_manifest(path_or_dir) -> dict
    verify_shards(out_dir) -> VerifyReport
    TarShardWriter, read_samples, read_shard, split_member_name, TarReadError,
    iter_members, read_dali_index, write_dali_index        (the shard tar format: lresnet.convert.shards)

The readers live in :mod:`lresnet.convert.recordio` and :mod:`lresnet.convert.pairs`.
Nothing here imports torch.
"""

from lresnet.convert.convert_rec import ConvertSummary, convert_rec, shuffle_plan
from lresnet.core.errors import InputError
from lresnet.convert.inspect import VerifyReport, summarize, verify_shards
from lresnet.convert.manifest import FORMAT as MANIFEST_FORMAT
from lresnet.convert.manifest import read_manifest
from lresnet.convert.shards import (
    ShardInfo,
    TarReadError,
    TarShardWriter,
    iter_members,
    read_dali_index,
    read_samples,
    read_shard,
    split_member_name,
    write_dali_index,
)

__all__ = [
    "ConvertSummary", "convert_rec", "shuffle_plan", "InputError", "VerifyReport", "summarize",
    "verify_shards", "MANIFEST_FORMAT", "read_manifest", "ShardInfo", "TarReadError", "TarShardWriter",
    "iter_members", "read_dali_index", "read_samples", "read_shard", "split_member_name", "write_dali_index",
]
