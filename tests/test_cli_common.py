"""What the sub-commands share (biasedit_peft.cli._common): the recorded command line, the --json copy."""

from __future__ import annotations

import argparse
import sys

from biasedit_peft.cli import build_parser
from biasedit_peft.cli._common import copy_file, recorded_command


def test_the_command_is_recorded_as_typed_shell_quoted_without_the_left_out_flags(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/bin/biasedit", "demo", "--out", "my dir", "--resume", "--seed", "1"])
    assert recorded_command("demo") == "biasedit demo --out 'my dir' --resume --seed 1"
    assert recorded_command("demo", leave_out=("--resume",)) == "biasedit demo --out 'my dir' --seed 1"


def test_called_as_a_function_the_command_is_rebuilt_from_the_arguments_or_none(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    parser, _ = build_parser()
    args = parser.parse_args(["debias", "--model", "tiny model", "--editor", "ed", "--out", "a", "--quiet"])
    assert recorded_command("debias", args) == (
        "biasedit debias --model 'tiny model' --editor ed --out a --data stereoset:train "
        "--batch-size 16 --adapter-name default --quiet")  # --calibrate-on's default is filled in by the run
    assert recorded_command("debias") is None
    flags = argparse.Namespace(command="demo", resume=True, seed=0, limit=None)
    assert recorded_command("demo", flags, leave_out=("--resume",)) == "biasedit demo --seed 0"


def test_json_copies_go_into_a_new_folder(tmp_path):
    source = tmp_path / "out" / "results.json"
    source.parent.mkdir()
    source.write_text('{"ss": 50.0}\n', encoding="utf-8")
    copy_file(source, tmp_path / "elsewhere" / "copy.json")
    assert (tmp_path / "elsewhere" / "copy.json").read_text(encoding="utf-8") == '{"ss": 50.0}\n'
