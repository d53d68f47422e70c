"""The CLI shell: every area's commands are wired in, and bad input is one line + exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lresnet.core.errors import InputError
from lresnet.tools import cli

EXPECTED_COMMANDS = ("synth", "convert-rec", "inspect", "verify", "train", "demo", "model-info", "export", "embed",
                     "synth-ijb", "bench")
EXPECTED_BENCHES = ("convert", "pipeline", "model", "verify", "train", "ijb", "device")


def _names(typer_app) -> set[str]:
    import typer.main

    group = typer.main.get_command(typer_app)
    return set(group.commands)


def test_every_command_is_registered():
    names = _names(cli.app)
    missing = [c for c in EXPECTED_COMMANDS if c not in names]
    assert not missing, f"commands missing from `lresnet --help`: {missing}"
    benches = _names(cli.bench)
    assert not [b for b in EXPECTED_BENCHES if b not in benches]


def test_input_error_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    import lresnet.convert.synthetic as synthetic

    def broken(*args, **kwargs):
        raise InputError("data/train.rec", "bad magic 0x00000000, expected 0xced7230a", where="record 7 (offset 4096)")

    monkeypatch.setattr(synthetic, "synthesize", broken)
    monkeypatch.setattr(sys, "argv", ["lresnet", "synth", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "lresnet: error: data/train.rec: record 7 (offset 4096): bad magic 0x00000000, expected 0xced7230a"


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "lresnet.tools", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "convert-rec" in result.stdout
