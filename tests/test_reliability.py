"""Nothing silent, nothing lost (issue 16): bad adapters are refused naming the file and tensor, the merged forward
is checked, and output folders are never overwritten without --overwrite and are swapped in whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import biasedit_peft
from biasedit_peft import BiasEditConfig, get_deltas, set_deltas
from biasedit_peft._io import OutputFolderError, check_output_folder, folder_in_place
from biasedit_peft.cli import main
from biasedit_peft.models import load_model

from factories import random_low_rank, save_word_model

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_word_model(tmp_path_factory.mktemp("words") / "model")


def write_adapter(model_dir, out, storage: str = "factored", scale: float = 0.5):
    peft_model = get_peft_model(load_model(str(model_dir)), BiasEditConfig(num_edit_layers=2, delta_storage=storage))
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for name, layer in biasedit_peft.edit_targets(peft_model).items():
        first, second = random_low_rank(layer.weight_shape, 2, scale, generator)
        deltas[name] = (first, second) if storage == "factored" else first @ second
    set_deltas(peft_model, deltas)
    peft_model.save_pretrained(out)
    return out


def tamper(adapter, change) -> str:
    """Apply ``change(tensors)`` to the adapter's weights file; returns the first key."""
    path = adapter / WEIGHTS
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    change(tensors, key)
    save_file(tensors, str(path))
    return key


def evaluate(model_dir, adapter, capsys) -> tuple[int, str]:
    code = main(["evaluate", "--model", str(model_dir), "--adapter", str(adapter), "--benchmark", "stereoset",
                 "--limit", "2", "--n-resamples", "0", "--quiet"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_delta_is_refused_naming_the_file_and_tensor(model_dir, tmp_path, capsys, bad):
    adapter = write_adapter(model_dir, tmp_path / "adapter")

    def poison(tensors, key):
        tensors[key][0, 0] = bad

    key = tamper(adapter, poison)
    assert "biasedit_A" in key
    code, err = evaluate(model_dir, adapter, capsys)
    assert code == 2 and str(adapter / WEIGHTS) in err and key in err and "non-finite" in err
    assert "Traceback" not in err
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="non-finite"):  # the Python API too (a load_state_dict hook)
        PeftModel.from_pretrained(load_model(str(model_dir)), str(adapter))


@pytest.mark.parametrize("case", ["renamed key", "layer missing", "delta_ranks removed"])
def test_an_adapter_whose_tensors_do_not_fit_the_model_is_refused(model_dir, tmp_path, capsys, case):
    adapter = write_adapter(model_dir, tmp_path / "adapter")
    if case == "renamed key":
        tamper(adapter, lambda tensors, key: tensors.__setitem__(key.replace("c_proj", "c_fc"), tensors.pop(key)))
    elif case == "layer missing":
        tamper(adapter, lambda tensors, key: [tensors.pop(k) for k in list(tensors) if ".h.1." in k])
    else:
        config_path = adapter / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["delta_ranks"], config["delta_storage"] = {}, "dense"
        config_path.write_text(json.dumps(config))
    code, err = evaluate(model_dir, adapter, capsys)
    assert code == 2 and "does not fit the model" in err and str(adapter / WEIGHTS) in err, err
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_a_truncated_weights_file_is_a_one_line_error(model_dir, tmp_path, capsys):
    adapter = write_adapter(model_dir, tmp_path / "adapter")
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])
    code, err = evaluate(model_dir, adapter, capsys)
    assert code == 2 and "not a readable safetensors file" in err and "Traceback" not in err


def test_huge_deltas_that_overflow_the_merged_forward_are_refused(model_dir, tmp_path, capsys):
    adapter = write_adapter(model_dir, tmp_path / "adapter", storage="dense", scale=1e30)  # finite, forward inf
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    assert "non-finite logits" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_merge_never_overwrites_a_folder_or_its_input(model_dir, tmp_path, capsys):
    adapter = write_adapter(model_dir, tmp_path / "adapter")
    old = save_word_model(tmp_path / "old-model")  # a model folder the user keeps
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(old)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(model_dir),
                 "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err
    # --overwrite replaces the folder whole: nothing of the old one is left (stale shards, index)
    (old / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(old),
                 "--overwrite"]) == 0
    assert not (old / "model-00001-of-00002.safetensors").exists() and (old / "merge_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".old-model.")]


def test_debias_and_train_editor_refuse_a_non_empty_out(model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    code = main(["debias", "--model", str(model_dir), "--editor", str(tmp_path / "no-editor"), "--out", str(out),
                 "--quiet"])
    assert code == 2 and "not empty" in capsys.readouterr().err and (out / "README.md").read_text() == "my notes"
    code = main(["train-editor", "--model", str(model_dir), "--out", str(out), "--quiet", "--max-steps", "1"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err and (out / "README.md").read_text() == "my notes"
    code = main(["train-editor", "--model", str(model_dir), "--out", str(out), "--quiet", "--resume"])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_that_is_a_file_or_under_one_is_refused_before_any_compute(tmp_path, where, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "sub"
    import biasedit_peft.sharing.merge as merge

    monkeypatch.setattr(merge, "merge_to_folder", lambda *a, **k: pytest.fail("computed before checking --out"))
    assert main(["merge", "--model", "testbed", "--adapter", "a", "--out", str(out)]) == 2
    assert "file" in capsys.readouterr().err


def test_an_unwritable_parent_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: let the check see what another user would
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(OutputFolderError, match="not writable"):
        check_output_folder(locked / "out")


def test_evaluate_never_replaces_an_existing_json(tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text('{"keep": true}')
    args = ["evaluate", "--model", "testbed", "--benchmark", "stereoset", "--limit", "1", "--n-resamples", "0",
            "--quiet", "--json", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"keep": True}
    assert main([*args, "--overwrite"]) == 0 and "stereoset" in json.loads(out.read_text())
    under_a_file = ["evaluate", "--model", "testbed", "--quiet", "--json", str(out / "x.json")]
    assert main(under_a_file) == 2 and "is a file" in capsys.readouterr().err


def test_folder_in_place_swaps_in_whole_or_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with folder_in_place(out) as building:
            (building / "half.txt").write_text("half")
            assert not (out / "half.txt").exists()  # nothing reaches out while the new folder is built
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with folder_in_place(out) as building:
        (building / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # like mkdir, not mkdtemp's 0700
    (tmp_path / ".out.tmp-killed").mkdir()  # a kill -9 left a half-built folder beside out
    (tmp_path / ".out.tmp-killed" / "big.bin").write_bytes(b"0" * 1000)
    with folder_in_place(out) as building:
        (building / "newer.txt").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_editor_and_checkpoint_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        _trainer(tmp_path, max_steps=1).train()
    finally:
        os.umask(previous)
    for path in [*tmp_path.glob("*.json"), *tmp_path.glob("*.safetensors"), *(tmp_path / "checkpoint").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o640, path


# ----- checkpoints as one unit ------------------------------------------------------------------------------
def _trainer(tmp_path, **kwargs):
    from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments

    from factories import editor_tokenizer, peft_model, samples

    model = peft_model()
    settings = dict(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=1.0, max_steps=2,
                    eval_every=1, progress=False, calibrate=False)
    args = BiasEditTrainingArguments(**{**settings, **kwargs})
    return BiasEditTrainer(model, BiasEditor.for_model(model, rank=8, lr=1e-2), args, samples(12), samples(8),
                           tokenizer=editor_tokenizer())


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import safetensors.torch

    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    assert "manifest.json" in before
    state = json.loads(before["trainer_state.json"])
    assert state["trainer"]["global_step"] == 1

    real = safetensors.torch.save_file

    def killed(tensors, path, *args, **kwargs):
        if "optimizer.safetensors" in str(path):
            raise KeyboardInterrupt  # the kill lands after the editor files of step 2 were written
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    resumed = _trainer(tmp_path, max_steps=2, resume=True)
    with pytest.raises(KeyboardInterrupt):
        resumed.train()
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before  # step 1's set, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.")]


def test_resume_refuses_other_settings_or_data_and_a_changed_file(tmp_path):
    _trainer(tmp_path, max_steps=1).train()
    with pytest.raises(ValueError, match="n_edits: checkpoint 4, now 6"):
        _trainer(tmp_path, resume=True, n_edits=6).train()
    with pytest.raises(ValueError, match="loc_coef: checkpoint 1.0, now 2.0"):
        _trainer(tmp_path, resume=True, loc_coef=2.0).train()
    _trainer(tmp_path, resume=True, max_steps=2).train()  # more steps: allowed
    optimizer = tmp_path / "checkpoint" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="optimizer.safetensors does not match its sha256"):
        _trainer(tmp_path, resume=True, max_steps=3).train()


def test_resume_refuses_another_data_size(tmp_path):
    from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments

    from factories import editor_tokenizer, peft_model, samples

    _trainer(tmp_path, max_steps=1).train()
    model = peft_model()
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=1.0,
                                     max_steps=2, eval_every=1, progress=False, calibrate=False, resume=True)
    trainer = BiasEditTrainer(model, BiasEditor.for_model(model, rank=8, lr=1e-2), args, samples(8), samples(8),
                              tokenizer=editor_tokenizer())
    with pytest.raises(ValueError, match="train samples: checkpoint 12, now 8"):
        trainer.train()


# ----- clear errors instead of tracebacks ---------------------------------------------------------------------
@pytest.fixture()
def editor_dir(tmp_path):
    from biasedit_peft.editor import BiasEditor

    from factories import peft_model

    editor = BiasEditor.for_model(peft_model(), rank=4)
    editor.save_pretrained(tmp_path / "editor")
    return tmp_path / "editor"


@pytest.mark.parametrize("case, message", [
    ("unknown key", "unknown key(s) ['colour']"), ("missing key", "missing key(s) ['targets']"),
    ("wrong type", "'rank' must be int"), ("targets as a list", "'targets' must map module names"),
    ("chunk_size 0", "chunk_size must be at least 1"), ("not UTF-8", "not UTF-8"),
    ("garbage weights", "not a readable safetensors file"), ("truncated weights", "not a readable safetensors"),
])
def test_a_broken_editor_folder_is_a_one_line_error_naming_the_file(editor_dir, case, message):
    from biasedit_peft.editor import BiasEditor

    config_path, weights = editor_dir / "config.json", editor_dir / "editor.safetensors"
    (editor_dir / "manifest.json").unlink()  # a folder without one (older, or hand-made): each check on its own
    config = json.loads(config_path.read_text())
    if case == "unknown key":
        config["colour"] = "blue"
    elif case == "missing key":
        del config["targets"]
    elif case == "wrong type":
        config["rank"] = "4"
    elif case == "targets as a list":
        config["targets"] = list(config["targets"])
    elif case == "chunk_size 0":
        config["chunk_size"] = 0
    config_path.write_text(json.dumps(config))
    if case == "not UTF-8":
        config_path.write_bytes(b"\xff\xfe" + config_path.read_bytes())
    elif case == "garbage weights":
        weights.write_bytes(b"garbage" * 10)
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError) as error:
        BiasEditor.from_pretrained(editor_dir)
    assert message in str(error.value)
    assert str(config_path if "weights" not in case else weights) in str(error.value)


def test_an_editor_file_changed_after_it_was_written_fails_its_manifest(editor_dir):
    from biasedit_peft.editor import BiasEditor

    config = json.loads((editor_dir / "config.json").read_text())
    config["lr"] = 1.0
    (editor_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json does not match its sha256 in manifest.json"):
        BiasEditor.from_pretrained(editor_dir)


def test_chunk_size_zero_is_refused_where_it_is_given():
    from biasedit_peft.editor.editor import _chunks

    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        list(_chunks(10, 0))


def test_user_files_that_are_not_utf8_or_have_bad_rows_name_the_file_and_line(tmp_path, capsys):
    from biasedit_peft.data import load_edit_samples

    latin = tmp_path / "pairs.jsonl"
    latin.write_bytes('{"stereotype": "caf\xe9", "anti_stereotype": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}: not UTF-8 text"):
        load_edit_samples(str(latin))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"stereotype": "a", "anti_stereotype": "b"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{rows}: line 3 is not a JSON object"):
        load_edit_samples(str(rows))
    rows.write_text('{"stereotype": "a", "anti_stereotype": ""}\n')
    with pytest.raises(ValueError, match=f"{rows}: line 1: 'anti_stereotype' must be a non-empty sentence"):
        load_edit_samples(str(rows))
    text = tmp_path / "text.txt"
    text.write_bytes("na\xefve\n".encode("latin-1"))
    code = main(["evaluate", "--model", "testbed", "--benchmark", "stereoset", "--limit", "1", "--n-resamples", "0",
                 "--perplexity-text", str(text), "--quiet"])
    assert code == 2 and f"{text}: not UTF-8 text" in capsys.readouterr().err


def test_a_file_of_one_bias_type_is_read_with_its_own_types_by_default(tmp_path):
    from biasedit_peft.cli.debias import _types_of
    from biasedit_peft.data import load_edit_samples

    rows = tmp_path / "gender.jsonl"
    rows.write_text("".join(json.dumps({"stereotype": f"s{i}", "anti_stereotype": f"a{i}", "bias_type": "gender"})
                            + "\n" for i in range(3)))
    samples = load_edit_samples(str(rows))
    assert len(samples) == 3 and _types_of(samples) == ["gender"]
    dev = load_edit_samples("stereoset:dev", _types_of(samples))
    assert {item.bias_type for item in dev} == {"gender"}
    assert {item.bias_type for item in load_edit_samples("stereoset:dev")} == {"gender", "race", "religion"}
    with pytest.raises(ValueError, match="no samples"):
        load_edit_samples(str(rows), ["race"])


def test_a_sentence_longer_than_the_models_context_is_refused_naming_it(tmp_path):
    from biasedit_peft.editor import BiasEditor
    from biasedit_peft.editor.cache import EditSample
    from biasedit_peft.scoring import model_context_length, score_sentences

    from factories import editor_tokenizer, peft_model

    model, tokenizer = peft_model(model_config={"n_positions": 8}), editor_tokenizer()
    assert model_context_length(model) == 8
    long = "he is a nurse and she is a pilot and he is a cook"  # 14 tokens + BOS
    with pytest.raises(ValueError, match=r"sentence 1 \('he is a nurse.*15 tokens with BOS, more than the model's "
                                         r"context of 8; 1 sentence\(s\)"):
        score_sentences(model, tokenizer, ["he is a nurse .", long])
    editor = BiasEditor.for_model(model, rank=4)
    with pytest.raises(ValueError, match="sample 0: he is a nurse and"):
        editor.cache_samples(model, tokenizer, [EditSample(long, "she is a nurse .")])


def test_debias_writes_a_named_adapter(model_dir, tmp_path, capsys):
    from biasedit_peft.editor import BiasEditor

    base = get_peft_model(load_model(str(model_dir)), BiasEditConfig(num_edit_layers=2))
    editor = BiasEditor.for_model(base, rank=4)
    for net in editor.nets.values():  # normaliser statistics, as a trained editor has
        net.normalizer.update(torch.randn(4, net.normalizer.mean.shape[-1]))
    editor.save_pretrained(tmp_path / "editor")
    common = ["debias", "--model", str(model_dir), "--editor", str(tmp_path / "editor"), "--limit", "2",
              "--calibrate-on", "none", "--quiet"]
    assert main([*common, "--adapter-name", "foo", "--out", str(tmp_path / "adapter")]) == 0, capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "unnamed")]) == 0, capsys.readouterr().err
    loaded = PeftModel.from_pretrained(load_model(str(model_dir)), str(tmp_path / "adapter" / "foo"),
                                       adapter_name="foo")
    assert set(loaded.peft_config) == {"foo"}
    unnamed = get_deltas(PeftModel.from_pretrained(load_model(str(model_dir)), str(tmp_path / "unnamed")))
    named = get_deltas(loaded, "foo")
    assert named.keys() == unnamed.keys() and all(named[k].abs().sum() > 0 for k in named)
    assert all(torch.equal(named[k], unnamed[k]) for k in named)  # the same edit, only the name differs


def test_every_command_takes_bias_types_and_a_per_type_limit():
    from biasedit_peft.cli import build_parser

    parser, _ = build_parser()
    for command in ("trace", "sweep-layers"):
        new = parser.parse_args([command, "--model", "m", "--bias-types", "gender,race", "--out", "o"])
        old = parser.parse_args([command, "--model", "m", "--bias-type", "gender,race", "--out", "o"])
        assert new.bias_type == old.bias_type == "gender,race"
    from biasedit_peft.data import load_stereoset
    from biasedit_peft.data.splits import take_per_type

    items = take_per_type(load_stereoset("test", ["gender", "race"]), 3)
    assert [item.bias_type for item in items].count("gender") == 3 and len(items) == 6


def test_crows_pairs_csv_as_edit_data_and_a_users_own_files_under_evaluate(tmp_path, capsys):
    import csv

    from biasedit_peft.data import load_crows, load_edit_samples, load_stereoset

    pairs = load_crows(["gender"])[:4] + load_crows(["race"])[:2]
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sent_more", "sent_less", "stereo_antistereo", "bias_type"])
        writer.writeheader()
        for p in pairs:
            writer.writerow({"sent_more": p.sent_more, "sent_less": p.sent_less, "stereo_antistereo": p.direction,
                             "bias_type": p.bias_type})
    samples = load_edit_samples(str(path))
    assert [s["stereotype"] for s in samples] == [p.sent_more for p in pairs]
    assert {s["bias_type"] for s in samples} <= {"gender", "race"}  # race-color read as ours
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--model", "testbed", "--data", str(path), "--n-resamples", "0", "--quiet",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"] == str(path) and "stereoset" not in result
    assert result["crows"]["overall"]["n"] == len(pairs)
    stereoset = tmp_path / "mine.json"
    items = load_stereoset("test", ["gender"])[:3]
    from biasedit_peft.data.resources import STEREOSET_FILES, resource_path
    from biasedit_peft.data.stereoset import read_stereoset_rows

    rows = [row for name in STEREOSET_FILES.values() for row in read_stereoset_rows(resource_path(name))
            if row["id"] in {item.id for item in items}]
    stereoset.write_text(json.dumps({"version": "1", "data": {"intrasentence": rows}}))
    assert main(["evaluate", "--model", "testbed", "--data", str(stereoset), "--n-resamples", "0", "--quiet",
                 "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["stereoset"]["gender"]["n"] == 3
    assert main(["evaluate", "--model", "testbed", "--data", str(tmp_path / "x.txt"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


KILLED_MERGE = """
import os, signal, sys
import transformers
real = transformers.PreTrainedModel.save_pretrained

def dies_midway(self, folder, *args, **kwargs):
    real(self, folder, *args, **kwargs)   # the weights are written...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process is killed before the tokenizer and the report

transformers.PreTrainedModel.save_pretrained = dies_midway
from biasedit_peft.cli import main
sys.exit(main(["merge", "--model", sys.argv[1], "--adapter", sys.argv[2], "--out", sys.argv[3], "--overwrite"]))
"""


def test_a_merge_killed_with_sigkill_leaves_the_old_folder_and_the_next_run_cleans_up(model_dir, tmp_path):
    import subprocess
    import sys

    adapter = write_adapter(model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("the user's previous merge")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MERGE)
    run = subprocess.run([sys.executable, str(script), str(model_dir), str(adapter), str(out)], capture_output=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old state, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.safetensors"))  # the half-built one, hidden
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out),
                 "--overwrite"]) == 0
    assert {"config.json", "merge_report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


KILLED_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import safetensors.torch
real = safetensors.torch.save_file

def dies(tensors, path, *args, **kwargs):
    if "optimizer.safetensors" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # the editor files of the new checkpoint are written by now
    return real(tensors, path, *args, **kwargs)

safetensors.torch.save_file = dies
from test_reliability import _trainer
from pathlib import Path
_trainer(Path(sys.argv[1]), max_steps=2, resume=True).train()
"""


def test_a_checkpoint_write_killed_with_sigkill_leaves_the_previous_checkpoint_whole(tmp_path):
    import subprocess
    import sys

    _trainer(tmp_path, max_steps=1).train()
    checkpoint = tmp_path / "checkpoint"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CHECKPOINT)
    tests = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, str(script), str(tmp_path), tests], capture_output=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tests)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    state = _trainer(tmp_path, max_steps=2, resume=True).train()  # the resume continues from step 1
    assert state.global_step == 2 and [r["step"] for r in state.history] == [1, 2]


def test_trace_refuses_a_non_empty_out_and_writes_its_folder_whole(tmp_path, capsys):
    out = tmp_path / "trace"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["trace", "--model", "testbed", "--limit", "3", "--samples", "1", "--kinds", "mlp", "--out", str(out),
            "--quiet"]
    assert main(args) == 2 and "not empty" in capsys.readouterr().err and (out / "notes.txt").is_file()
    assert main([*args, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "trace.json" in names and "notes.txt" not in names
    assert f"wrote {out / 'trace.json'}" in capsys.readouterr().out


def test_bench_refuses_an_earlier_bench_unless_overwrite(tmp_path, capsys, monkeypatch):
    from biasedit_peft.workflows import bench

    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text("{}")
    monkeypatch.setattr(bench, "run_bench", lambda config, **kwargs: pytest.fail("ran before checking --out"))
    assert main(["bench", "--sections", "forward", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "bench.json").read_text() == "{}"
    monkeypatch.setattr(bench, "run_bench", lambda config, **kwargs: {"sections": {}})
    monkeypatch.setattr(bench, "format_bench", lambda results: "")
    assert main(["bench", "--sections", "forward", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "bench.json").exists()  # the earlier bench was removed; the stub wrote nothing


# ----- resumable commands: the run is built beside --out and swapped in whole ------------------------------
def test_resumable_folder_keeps_an_interrupted_run_and_swaps_in_a_finished_one(tmp_path):
    from biasedit_peft._io import check_resumable_output_folder, resumable_folder_in_place, run_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with resumable_folder_in_place(out) as run:
            (run / "step1.txt").write_text("1")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old state, whole
    assert sorted(p.name for p in run_folder(out).iterdir()) == ["step1.txt"]
    with pytest.raises(OutputFolderError, match="interrupted run.*--resume.*--overwrite"):
        check_resumable_output_folder(out, overwrite=False)
    with resumable_folder_in_place(check_resumable_output_folder(out, resume=True), resume=True) as run:
        assert sorted(p.name for p in run.iterdir()) == ["step1.txt"]  # continues the interrupted run
        (run / "step2.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["step1.txt", "step2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with resumable_folder_in_place(out, resume=True) as run:  # no run folder: a copy of the finished one
        assert sorted(p.name for p in run.iterdir()) == ["step1.txt", "step2.txt"]
        (run / "step1.txt").write_text("changed")
        assert (out / "step1.txt").read_text() == "1"  # a copy, not the same files
    assert (out / "step1.txt").read_text() == "changed"
    with pytest.raises(OutputFolderError, match="not empty.*pass --resume to continue it or --overwrite"):
        check_resumable_output_folder(out)
    with pytest.raises(OutputFolderError, match="no run of --out"):
        check_resumable_output_folder(tmp_path / "empty", resume=True)


def test_train_editor_interrupted_leaves_out_whole_and_resume_finishes_it(model_dir, tmp_path, capsys, monkeypatch):
    from biasedit_peft._io import run_folder
    from biasedit_peft.editor import BiasEditTrainer

    out = tmp_path / "editor"
    args = ["train-editor", "--model", str(model_dir), "--out", str(out), "--quiet", "--limit", "4",
            "--eval-data", "none", "--n-edits", "2", "--batch-size", "2", "--rank", "4"]
    assert main([*args, "--max-steps", "1"]) == 0
    capsys.readouterr()
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = BiasEditTrainer.edit_step

    def interrupted_after_step_2(self, *args, **kwargs):
        metrics = real(self, *args, **kwargs)
        if self.state.global_step == 2:
            raise KeyboardInterrupt  # Ctrl-C: the trainer checkpoints step 2, in the run folder
        return metrics

    monkeypatch.setattr(BiasEditTrainer, "edit_step", interrupted_after_step_2)
    assert main([*args, "--max-steps", "3", "--overwrite"]) == 130
    assert "--resume" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == old  # old run, whole
    state = json.loads((run_folder(out) / "checkpoint" / "trainer_state.json").read_text())
    assert state["trainer"]["global_step"] == 2
    assert main([*args, "--max-steps", "3"]) == 2  # a fresh start would discard the interrupted run
    assert "interrupted run" in capsys.readouterr().err
    monkeypatch.setattr(BiasEditTrainer, "edit_step", real)
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert "trained 3 meta-steps" in capsys.readouterr().out and not run_folder(out).exists()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["trainer"]["global_step"] == 3
    assert str(run_folder(out)) not in "".join(p.read_text() for p in out.rglob("*.json")) + \
        (out / "README.md").read_text()


def test_bench_resume_keeps_complete_sections_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    from biasedit_peft.workflows import bench

    calls = []

    def fake(section):
        def measure(config):
            calls.append(section)
            if section == "size" and calls.count("size") == 1:
                raise KeyboardInterrupt
            return {"value": len(calls)}
        return measure

    monkeypatch.setattr(bench, "SECTION_FUNCTIONS", {name: fake(name) for name in ("forward", "size")})
    monkeypatch.setattr(bench, "format_bench", lambda results: "")
    out = tmp_path / "bench"
    args = ["bench", "--sections", "forward,size", "--out", str(out), "--quiet"]
    assert main(args) == 130 and not out.exists() and "--resume" in capsys.readouterr().err
    assert main([*args, "--seed", "1", "--resume"]) == 2
    assert "seed: stored 0, now 1" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert calls == ["forward", "size", "size"]  # forward was complete and kept
    sections = json.loads((out / "bench.json").read_text())["sections"]
    assert sections["forward"]["value"] == 1 and sections["size"]["value"] == 3


@pytest.mark.parametrize("finished", [False, True])
def test_a_bench_resumed_on_another_device_refuses_its_unfinished_quality_section_before_measuring(
        tmp_path, monkeypatch, finished):
    """A bench may change device on resume (its timing sections record theirs), but the demos of an unfinished
    quality section may not: that is refused before any section runs, naming the variant and the field, whether
    the variant's demo was interrupted (its run folder) or finished (its folder)."""
    import dataclasses

    from biasedit_peft._io import run_folder
    from biasedit_peft.progress_store import ResumeMismatch, StageStore
    from biasedit_peft.workflows import bench
    from biasedit_peft.workflows.demo import demo_fingerprint

    config = bench.BenchConfig(sections=("forward", "quality"), out=str(tmp_path / "b"), progress=False,
                               device="cpu")
    demo = bench.quality_demo_config(config, "default", tmp_path / "work")
    made_elsewhere = {**demo_fingerprint(demo), "device": "cuda"}
    folder = Path(demo.out) if finished else run_folder(demo.out)
    StageStore(folder / "stages", ()).open(made_elsewhere, resume=False)
    if finished:
        (folder / "results.json").write_text("{}")
    calls = []
    monkeypatch.setattr(bench, "SECTION_FUNCTIONS", {"forward": lambda config: calls.append("forward") or {},
                                                     "quality": None})
    monkeypatch.setattr(bench, "bench_quality", lambda *args, **kwargs: calls.append("quality") or {})
    with pytest.raises(ResumeMismatch, match=r"quality variant 'default' of this bench: .*device: stored 'cuda', "
                                             r"now 'cpu'.*--sections"):
        bench.run_bench(config, folder=tmp_path / "work", resume=True)
    assert calls == []
    assert bench.run_bench(dataclasses.replace(config, sections=("forward",)), folder=tmp_path / "work",
                           resume=True)
    assert calls == ["forward"]  # without the quality section, the device may change


KILLED_TRAINING = """
import os, signal, sys
from biasedit_peft.editor import BiasEditTrainer
real = BiasEditTrainer.edit_step

def dies_in_step_3(self, samples, train, **kwargs):
    if train and self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # step 2 was validated and checkpointed in the run folder
    return real(self, samples, train, **kwargs)

BiasEditTrainer.edit_step = dies_in_step_3
from biasedit_peft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_train_editor_killed_with_sigkill_leaves_out_whole_and_resumes(model_dir, tmp_path, capsys):
    import subprocess
    import sys

    from biasedit_peft._io import run_folder

    out = tmp_path / "editor"
    out.mkdir()
    (out / "old.txt").write_text("the user's previous editor")
    args = ["train-editor", "--model", str(model_dir), "--out", str(out), "--quiet", "--limit", "4",
            "--eval-every", "1", "--n-edits", "2", "--batch-size", "2", "--rank", "4", "--max-steps", "3"]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_TRAINING)
    run = subprocess.run([sys.executable, str(script), *args, "--overwrite"], capture_output=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old state, whole
    state = json.loads((run_folder(out) / "checkpoint" / "trainer_state.json").read_text())
    assert state["trainer"]["global_step"] == 2
    assert main([*args, "--resume"]) == 0 and "trained 3 meta-steps" in capsys.readouterr().out
    assert not run_folder(out).exists() and "old.txt" not in {p.name for p in out.iterdir()}
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert [r["step"] for r in state["trainer"]["history"]] == [1, 2, 3]
