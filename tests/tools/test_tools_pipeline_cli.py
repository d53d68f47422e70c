"""`lresnet bench pipeline --json`: every configuration with its rates and ratios."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lresnet.tools import cli


@pytest.mark.slow
def test_bench_pipeline_json(tmp_path):
    result = CliRunner().invoke(cli.app, ["bench", "pipeline", "--images", "256", "--batch-size", "32",
                                          "--rounds", "1", "--work-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["format"], doc["images"], doc["batch_size"], doc["rounds"]) == ("lresnet-bench-pipeline/1", 256, 32, 1)
    rows = {row["name"]: row for row in doc["results"]}
    limit = next(row for name, row in rows.items() if name.startswith("(a)"))
    assert limit["rate_vs_limit"] == 1.0 and limit["cpu_rate_vs_limit"] == 1.0
    assert any(name.startswith("(b) pipeline from shards, 2 workers") for name in rows)
    for row in rows.values():
        assert row["rate"] > 0 and row["cpu_rate"] > 0 and row["images"] > 0
        assert row["rate_vs_peer"] > 0
    assert list(tmp_path.iterdir()) == []
