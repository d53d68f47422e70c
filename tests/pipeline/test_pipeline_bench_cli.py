"""`lresnet bench pipeline`: runs end to end on a tiny data set; bad arguments are one-line errors."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from lresnet.tools import cli


@pytest.mark.slow
def test_bench_pipeline_reports_every_configuration(tmp_path):
    result = CliRunner().invoke(cli.app, ["bench", "pipeline", "--images", "256", "--batch-size", "32",
                                          "--rounds", "1", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for row in ("(a) simplejpeg decode", "(b) pipeline from shards, in-process", "1 worker", "2 workers",
                "(c) map-style Dataset"):
        assert row in result.output
    from lresnet.pipeline.bench import dali_available

    dali_rows = ("(d) DALI CPU pipeline, 1 thread", "DALI CPU (d) vs lresnet in-process (b)")
    assert all((row in result.output) == dali_available() for row in dali_rows)
    assert list(tmp_path.iterdir()) == []  # the temporary data is removed


def test_bench_pipeline_too_few_images_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lresnet", "bench", "pipeline", "--images", "10"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lresnet: error: --images")
