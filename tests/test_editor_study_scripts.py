"""``scripts/_study_args.py`` and ``scripts/edit_size_curve.py`` on the bundled testbed with an untrained editor
(3 items per bias type, edits of 2 items and one joint edit per type)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from biasedit_peft.editor import BiasEditor
from biasedit_peft.workflows.demo import DemoConfig, build_model

from factories import script_module


def _study_parser() -> argparse.ArgumentParser:
    study_args = script_module("_study_args")
    parser = argparse.ArgumentParser()
    study_args.add_editor_study_arguments(parser)
    return parser


def test_an_existing_report_is_refused_without_overwrite(tmp_path, capsys):
    study_args = script_module("_study_args")
    out = tmp_path / "report.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        study_args.parse_study_arguments(_study_parser(), ["--editor", "e", "--out", str(out)])
    assert stop.value.code == 2
    assert f"--out {out} exists; pass --overwrite" in capsys.readouterr().err
    args = study_args.parse_study_arguments(_study_parser(), ["--editor", "e", "--out", str(out), "--overwrite"])
    assert (args.model, args.batch_size, args.limit, args.out) == ("testbed", 16, None, str(out))
    assert out.read_text() == "{}"


def test_the_edit_size_curve_scores_the_same_items_at_every_size(tmp_path):
    peft_model, _, _ = build_model(DemoConfig(model="testbed", progress=False))
    editor = BiasEditor.for_model(peft_model, rank=8)
    generator = torch.Generator().manual_seed(0)
    for net in editor.nets.values():  # unit statistics stand in for meta-training's
        net.normalizer.update(torch.randn(64, len(net.normalizer.mean), generator=generator))
    editor.save_pretrained(tmp_path / "editor")
    out = tmp_path / "curve.json"
    script = script_module("edit_size_curve")
    assert script.main(["--editor", str(tmp_path / "editor"), "--limit", "3", "--sizes", "2,4096",
                        "--batch-size", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_items"] == 9
    small, joint = report["rows"]
    assert (small["edit_batch_size"], small["n_batches"]) == (2, 3 * math.ceil(3 / 2))
    assert (joint["edit_batch_size"], joint["n_batches"]) == (4096, 3)
    for bias_type in ("gender", "race", "religion"):
        assert small["before"][bias_type] == joint["before"][bias_type]
        assert 0.0 <= small["after"][bias_type]["ss"] <= 100.0
