"""The examples in examples/ run and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs():
    result = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "deltas after save/load bitwise identical: True" in result.stdout
    assert "merged model class: GPT2LMHeadModel" in result.stdout


def test_debias_testbed_example_runs_and_the_reloaded_adapter_scores_the_same():
    result = subprocess.run([sys.executable, "examples/debias_testbed.py", "--steps", "2", "--limit", "6"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    pairs = (line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    lines = {key: value.strip() for key, value in pairs}
    assert lines["SS after"] == lines["SS reloaded"]
    assert "meta-trained 2 steps" in result.stdout
