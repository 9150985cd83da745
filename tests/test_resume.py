"""Resumable runs (biasedit_peft.progress_store): pieces of scores and demo stages written as they finish.

On the bundled testbed with a few items per bias type. A kill is simulated by a scorer or a stage that
raises ``KeyboardInterrupt`` part-way; calls are counted to check that a resume redoes only what is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import biasedit_peft.evaluation as evaluation
import biasedit_peft.workflows.demo as demo_module
import biasedit_peft.workflows.protocols as protocols
from biasedit_peft._io import run_folder
from biasedit_peft.cli import main
from biasedit_peft.data import gender_swapped, load_crows, load_stereoset
from biasedit_peft.evaluation import evaluate_model, score_in_pieces, take_per_type
from biasedit_peft.models import cpu_identity, load_model_and_tokenizer
from biasedit_peft.progress_store import PreviousRunError, ResumeMismatch, ScoreStore
from biasedit_peft.scoring import SCORE_FIELDS, score_sentences
from biasedit_peft.workflows.demo import DemoConfig, run_demo

PARAGRAPHS = ["The river runs past the old mill and into the valley.", "A recipe needs flour, water and salt.",
              "The train left the station at noon.", "Rain fell on the roof all night long."]
EVALUATE_ARGS = ["evaluate", "--model", "testbed", "--bias-types", "gender,race", "--limit", "4", "--batch-size", "4",
                 "--n-resamples", "20", "--quiet"]
PIECE = 8  # sentences per piece here: 3 StereoSet pieces (24 sentences), 2 gender-swapped (12), 2 CrowS-Pairs (16),
N_PIECES = 8  # and 1 perplexity (4)


class CountingScorer:
    """Stands in for ``score_sentences``: counts calls and their sentences, and raises KeyboardInterrupt
    (a simulated kill) on call number ``fail_at`` (1-based) or whenever ``fail_when()`` is true."""

    def __init__(self, fail_at: int | None = None, fail_when=None):
        self.calls: list[list[str]] = []
        self.fail_at, self.fail_when = fail_at, fail_when

    def __call__(self, model, tokenizer, sentences, *args, **kwargs):
        if (self.fail_at is not None and len(self.calls) + 1 == self.fail_at) or (self.fail_when and self.fail_when()):
            raise KeyboardInterrupt
        self.calls.append(list(sentences))
        return score_sentences(model, tokenizer, sentences, *args, **kwargs)


@pytest.fixture(scope="module")
def testbed():
    return load_model_and_tokenizer("testbed")


@pytest.fixture
def small_pieces(monkeypatch, tmp_path) -> list[str]:
    """Pieces of :data:`PIECE` sentences; the ``evaluate`` arguments with a 4-paragraph perplexity text."""
    monkeypatch.setattr(evaluation, "PIECE_SENTENCES", PIECE)
    text = tmp_path / "neutral.txt"
    text.write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return EVALUATE_ARGS + ["--perplexity-text", str(text)]


def scorer(monkeypatch, **kwargs) -> CountingScorer:
    counting = CountingScorer(**kwargs)
    monkeypatch.setattr(evaluation, "score_sentences", counting)
    return counting


# ----- pieces of scores ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size, piece_size", [(8, 20), (16, 7)])
def test_scores_in_stored_pieces_are_bitwise_the_unchunked_ones(testbed, tmp_path, monkeypatch, batch_size,
                                                                 piece_size):
    model, tokenizer = testbed
    items = load_stereoset("test", ["gender", "race"])[:20]
    sentences = [item.sentence(role) for role in evaluation.STEREOSET_ROLES for item in items]
    whole = score_sentences(model, tokenizer, sentences, batch_size=batch_size)
    store = ScoreStore(tmp_path / "store")
    first = score_in_pieces(model, tokenizer, sentences, "stereoset", store, batch_size, False, piece_size)
    n_pieces = math.ceil(len(sentences) / evaluation.piece_size_for(batch_size, piece_size))
    assert len(list(store.root.glob("stereoset-*.safetensors"))) == n_pieces
    counting = scorer(monkeypatch)
    again = score_in_pieces(model, tokenizer, sentences, "stereoset", store, batch_size, False, piece_size)
    assert counting.calls == []  # every piece came from the store
    for name in SCORE_FIELDS:
        assert torch.equal(getattr(first, name), getattr(whole, name)), name
        assert torch.equal(getattr(again, name), getattr(whole, name)), name


def test_piece_size_is_whole_batches():
    assert [evaluation.piece_size_for(32, n) for n in (1, 32, 33, 512)] == [32, 32, 64, 512]
    assert evaluation.piece_size_for(4, 8) == 8 and evaluation.piece_size_for(3, 8) == 9


def test_evaluate_model_resumes_from_its_store(testbed, tmp_path, monkeypatch, small_pieces):
    model, tokenizer = testbed
    kwargs = dict(bias_types=["gender", "race"], limit=4, batch_size=4, progress=False, n_resamples=20,
                  perplexity_text=PARAGRAPHS)
    whole = evaluate_model(model, tokenizer, **kwargs)
    counting = scorer(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, tokenizer, store=tmp_path / "store", **kwargs)
    assert len(counting.calls) == 3 and len(list((tmp_path / "store").glob("*.safetensors"))) == 3
    counting = scorer(monkeypatch)
    resumed = evaluate_model(model, tokenizer, store=tmp_path / "store", **kwargs)
    assert resumed == whole
    total = 3 + len(counting.calls)
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == total == N_PIECES


# ----- biasedit evaluate --json FILE [--resume | --overwrite] -----------------------------------------------
def test_killed_evaluate_resumes_to_the_same_json_scoring_only_the_missing_pieces(tmp_path, monkeypatch, capsys,
                                                                                small_pieces):
    uninterrupted = scorer(monkeypatch)
    assert main(small_pieces + ["--json", str(tmp_path / "a.json")]) == 0
    n_pieces = len(uninterrupted.calls)
    assert n_pieces == N_PIECES and not (tmp_path / "a.json.partial").exists()

    out = tmp_path / "b.json"
    killed = scorer(monkeypatch, fail_at=4)
    assert main(small_pieces + ["--json", str(out)]) == 130
    assert len(killed.calls) == 3 and not out.exists()
    assert "--resume" in capsys.readouterr().err
    assert len(list((tmp_path / "b.json.partial").glob("*.safetensors"))) == 3

    resumed = scorer(monkeypatch)
    assert main(small_pieces + ["--json", str(out), "--resume"]) == 0
    assert len(resumed.calls) == n_pieces - 3
    assert resumed.calls == uninterrupted.calls[3:]
    assert out.read_text() == (tmp_path / "a.json").read_text()
    assert not (tmp_path / "b.json.partial").exists()


def test_evaluate_refuses_a_partial_store_without_resume_and_overwrite_starts_again(tmp_path, monkeypatch, capsys,
                                                                                   small_pieces):
    out = tmp_path / "r.json"
    scorer(monkeypatch, fail_at=2)
    assert main(small_pieces + ["--json", str(out)]) == 130
    capsys.readouterr()
    assert main(small_pieces + ["--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err and "r.json.partial" in err
    counting = scorer(monkeypatch)
    assert main(small_pieces + ["--json", str(out), "--overwrite"]) == 0
    assert len(counting.calls) == N_PIECES  # everything scored again
    assert json.loads(out.read_text())["stereoset"]["overall"]["n"] == 8
    assert main(small_pieces + ["--resume"]) == 2
    assert "--resume needs --json" in capsys.readouterr().err


@pytest.mark.parametrize("change, field", [(["--limit", "3"], "stereoset sentences"),
                                           (["--batch-size", "2"], "batch_size")])
def test_resume_with_other_inputs_is_refused_naming_the_field(tmp_path, monkeypatch, capsys, small_pieces, change,
                                                              field):
    out = tmp_path / "m.json"
    scorer(monkeypatch, fail_at=2)
    assert main(small_pieces + ["--json", str(out)]) == 130
    capsys.readouterr()
    args = list(small_pieces)
    position = args.index(change[0])
    args[position + 1] = change[1]
    counting = scorer(monkeypatch)
    assert main(args + ["--json", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "--overwrite" in err, err
    assert counting.calls == []
    assert len(list((tmp_path / "m.json.partial").glob("*.safetensors"))) == 1  # left as it was


def test_store_refuses_another_model_or_adapter(testbed, tmp_path):
    model, tokenizer = testbed
    store = ScoreStore(tmp_path / "s")
    evaluate_model(model, tokenizer, benchmarks=("stereoset",), bias_types=["gender"], limit=2, progress=False,
                   n_resamples=0, store=store)
    refused = (r"different model, adapter \(model: stored '.*testbed.*', now 'other'; "
               r"adapter: stored None, now 'x'\)")
    with pytest.raises(ResumeMismatch, match=refused):
        evaluate_model(model, tokenizer, benchmarks=("stereoset",), bias_types=["gender"], limit=2, progress=False,
                       n_resamples=0, store=store, model_name="other", adapter="x")


def test_a_store_labelling_a_field_records_the_label_and_accepts_a_store_made_before_the_label(tmp_path):
    fields = {"model": "runs/x/merged", "weights": "sha256 ab"}
    labelled = ScoreStore(tmp_path / "new", labels={"model": "OUT/merged"})
    labelled.require(fields)
    assert labelled.fields() == {"model": "OUT/merged", "weights": "sha256 ab"}
    ScoreStore(tmp_path / "new", labels={"model": "OUT/merged"}).require({**fields, "model": "../x/merged"})
    with pytest.raises(ResumeMismatch, match=r"different weights \(weights: stored 'sha256 ab', now 'sha256 cd'\)"):
        labelled.require({**fields, "weights": "sha256 cd"})  # the label stands for the name, not the contents
    with pytest.raises(ResumeMismatch, match="different model"):
        ScoreStore(tmp_path / "new").require(fields)  # the same folder read without the label
    before = ScoreStore(tmp_path / "old")  # made before the label: the name as given was recorded
    before.require(fields)
    ScoreStore(tmp_path / "old", labels={"model": "OUT/merged"}).require(fields)
    assert before.fields() == {"model": "OUT/merged", "weights": "sha256 ab"}  # recorded as the label from now on
    ScoreStore(tmp_path / "old2").require(fields)
    with pytest.raises(ResumeMismatch, match=r"model: stored 'runs/x/merged', now 'OUT/merged'"):
        ScoreStore(tmp_path / "old2", labels={"model": "OUT/merged"}).require({**fields, "model": "../x/merged"})


# ----- biasedit demo [--resume | --overwrite] --------------------------------------------------------------
DEMO = DemoConfig(bias_types=("gender", "race"), limit=4, max_steps=1, eval_every=1, n_resamples=0, progress=False)
STAGE_FUNCTIONS = {  # module, attribute: what each demo stage calls to do its work
    "evaluate": (demo_module, "evaluate"), "train_editor": (demo_module, "train_editor"),
    "per_batch_protocol": (protocols, "per_batch_protocol"), "held_out_protocol": (protocols, "held_out_protocol"),
    "joint_protocol": (protocols, "joint_protocol"),
    "debias_and_save": (demo_module, "debias_and_save"), "merge_and_rescore": (demo_module, "merge_and_rescore"),
}


def count_stage_calls(monkeypatch) -> dict[str, int]:
    counts = dict.fromkeys(STAGE_FUNCTIONS, 0)
    for name, (module, attribute) in STAGE_FUNCTIONS.items():
        original = getattr(module, attribute)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, counted)
    return counts


def comparable(out: Path, reference: Path) -> dict:
    """``out/results.json`` with ``out`` written as ``reference`` and the run's timings left out."""
    results = json.loads((out / "results.json").read_text().replace(str(out), str(reference)))
    for key in ("seconds", "resumed_stages"):
        results.pop(key)
    return results


@pytest.fixture(scope="module")
def uninterrupted_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "a"
    results = run_demo(replace(DEMO, out=str(out)))
    assert results["resumed_stages"] == [] and (out / "stages" / "merge_and_rescore.json").is_file()
    assert not list((out / "stages").glob("*.partial"))
    return out


def test_demo_killed_mid_evaluation_resumes_to_the_same_results(uninterrupted_demo, tmp_path, monkeypatch):
    out = tmp_path / "b"
    config = replace(DEMO, out=str(out))
    run = run_folder(out)
    partial = run / "stages" / "evaluate_after.partial"
    scorer(monkeypatch, fail_when=lambda: any(partial.glob("*.safetensors")))  # after its first piece
    with pytest.raises(KeyboardInterrupt):
        run_demo(config)
    assert not out.exists()  # the unfinished demo lies only under the hidden run folder
    finished = sorted(p.stem for p in (run / "stages").glob("*.json"))
    assert finished == sorted(["config", "sessions", "evaluate_before", "train_editor", "per_batch_protocol",
                               "held_out_protocol", "joint_on_test", "debias"])
    assert [p.name for p in partial.glob("*.safetensors")] == ["stereoset-00000.safetensors"]

    counts = count_stage_calls(monkeypatch)
    counting = scorer(monkeypatch)
    results = run_demo(config, resume=True)
    assert counts == {"evaluate": 2, "train_editor": 0, "per_batch_protocol": 0, "held_out_protocol": 0,
                      "joint_protocol": 0, "debias_and_save": 0,
                      "merge_and_rescore": 1}  # evaluate: the rest of "after", the merged
    crows = take_per_type(load_crows(["gender", "race-color"]), DEMO.limit)
    swapped = gender_swapped(take_per_type(load_stereoset("test", ["gender"]), DEMO.limit))
    assert sorted(counting.calls[0]) == sorted(item.sentence(role) for item in swapped
                                               for role in evaluation.STEREOSET_ROLES)
    assert sorted(counting.calls[1]) == sorted([p.sent_more for p in crows] + [p.sent_less for p in crows])
    assert len(counting.calls) == 7  # crows, gender-swapped, perplexity of "after", then the merged model's four
    assert results["resumed_stages"] == ["evaluate_before", "train_editor", "per_batch_protocol",
                                         "held_out_protocol", "joint_on_test", "debias"]
    assert not run.exists() and (out / "results.json").is_file() and (out / "before_after.png").is_file()
    assert str(run) not in (out / "results.json").read_text() + (out / "adapter" / "adapter_config.json").read_text()
    assert comparable(out, uninterrupted_demo) == comparable(uninterrupted_demo, uninterrupted_demo)
    card = (out / "adapter" / "README.md").read_text().replace(str(out), str(uninterrupted_demo))
    assert card == (uninterrupted_demo / "adapter" / "README.md").read_text()
    assert not list((out / "stages").glob("*.partial"))


def test_demo_resume_passes_resume_to_training_and_skips_finished_stages(tmp_path, monkeypatch):
    config = replace(DEMO, out=str(tmp_path / "t"), merge=False, crows=False)

    def killed_training(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "train_editor", killed_training)
    with pytest.raises(KeyboardInterrupt):
        run_demo(config)
    assert (run_folder(tmp_path / "t") / "stages" / "evaluate_before.json").is_file()
    assert main(["demo", "--out", str(tmp_path / "t"), "--quiet"]) == 2  # a fresh start would discard it
    counts = count_stage_calls(monkeypatch)
    seen = {}

    def stop_in_training(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "train_editor", stop_in_training)
    with pytest.raises(KeyboardInterrupt):
        run_demo(config, resume=True)
    assert counts["evaluate"] == 0 and seen["resume"] is True


def test_a_demo_resumed_on_another_machine_or_thread_count_warns_before_computing_and_records_it(
        tmp_path, monkeypatch, capsys):
    """Each session of a run (start, every resume) is listed in ``stages/sessions.json``. A resume on another CPU,
    thread count or device runs (the config is the same), but warns before any stage runs, even when the earlier
    session only began the stage now resumed (training from its checkpoint), and results.json names the earlier
    sessions. A fresh run starts the list anew; a run resumed where it was made says nothing."""
    config = replace(DEMO, out=str(tmp_path / "t"), merge=False, crows=False)
    here = demo_module.made_on(config)
    assert here == {"cpu": cpu_identity()["model"], "threads": torch.get_num_threads(), "device": "cpu"}
    elsewhere = {**here, "cpu": "Another CPU", "threads": here["threads"] + 3}
    real_training = demo_module.train_editor
    warned_before_training = []

    def killed_training(*args, **kwargs):
        raise KeyboardInterrupt

    def training(*args, **kwargs):
        warned_before_training.append("warning: this run was started or resumed before" in capsys.readouterr().err)
        return real_training(*args, **kwargs)

    monkeypatch.setattr(demo_module, "made_on", lambda config: elsewhere)
    monkeypatch.setattr(demo_module, "train_editor", killed_training)
    with pytest.raises(KeyboardInterrupt):
        run_demo(config)  # killed in training: evaluate_before finished, training begun
    sessions = run_folder(tmp_path / "t") / "stages" / "sessions.json"
    assert json.loads(sessions.read_text()) == [{**elsewhere, "first_stage": "evaluate_before"}]
    monkeypatch.setattr(demo_module, "made_on", lambda config: here)
    monkeypatch.setattr(demo_module, "train_editor", training)
    capsys.readouterr()
    results = run_demo(config, resume=True)
    assert warned_before_training == [True]
    assert results["environment"]["sessions_elsewhere"] == [{**elsewhere, "first_stage": "evaluate_before"}]
    assert json.loads((tmp_path / "t" / "stages" / "sessions.json").read_text()) == [
        {**elsewhere, "first_stage": "evaluate_before"}, {**here, "first_stage": "train_editor"}]
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["environment"]["sessions_elsewhere"] == results["environment"]["sessions_elsewhere"]
    again = run_demo(replace(config, out=str(tmp_path / "u")))  # one machine throughout: nothing to say
    assert "sessions_elsewhere" not in again["environment"] and "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "u" / "stages" / "sessions.json").read_text()) == [
        {**here, "first_stage": "evaluate_before"}]


def test_demo_resume_with_another_config_is_refused_naming_the_fields(uninterrupted_demo):
    before = sorted(p.name for p in (uninterrupted_demo / "stages").iterdir())
    refused = r"different limit, seed \(limit: stored 4, now 5; seed: stored 0, now 1\)"
    with pytest.raises(ResumeMismatch, match=refused):
        run_demo(replace(DEMO, out=str(uninterrupted_demo), limit=5, seed=1), resume=True)
    assert sorted(p.name for p in (uninterrupted_demo / "stages").iterdir()) == before
    assert not run_folder(uninterrupted_demo).exists()  # refused before anything was copied


def test_demo_refuses_an_out_holding_a_demo_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "old"
    (out / "stages").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err and str(out) in err
    assert main(["demo", "--out", str(out), "--resume", "--quiet"]) == 2  # nothing to check the settings against
    assert "stages/config.json" in capsys.readouterr().err


def test_overwrite_replaces_out_whole_and_only_when_the_demo_ends(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    config = replace(DEMO, out=str(out), merge=False, crows=False)
    with pytest.raises(PreviousRunError, match="--overwrite"):
        run_demo(config)

    def killed_training(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(demo_module, "train_editor", killed_training)
        with pytest.raises(KeyboardInterrupt):
            run_demo(config, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json"]  # the old state, whole
    assert (out / "results.json").read_text() == "{}" and run_folder(out).is_dir()
    results = run_demo(config, overwrite=True)  # discards the interrupted run, starts afresh
    assert results["resumed_stages"] == [] and not run_folder(out).exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "before_after.png", "editor", "results.json",
                                                      "stages"]


@pytest.mark.parametrize("stage, rescored", [("evaluate_after", 5), ("merge_and_rescore", 2)])
def test_a_demo_killed_mid_evaluation_resumes_from_another_working_directory(tmp_path, monkeypatch, stage, rescored):
    """A relative ``--out`` names the same run from another working directory: the score stores of the run's own
    outputs (its adapter, its merged checkpoint) name them relative to ``OUT``, so the resume scores only what is
    missing instead of refusing the store, and the results name the folders as the resuming session gave them."""
    first = tmp_path / "first"
    (first / "sub").mkdir(parents=True)
    monkeypatch.chdir(first)
    config = replace(DEMO, out="b", crows=False)
    partial = first / run_folder("b") / "stages" / f"{stage}.partial"
    scorer(monkeypatch, fail_when=lambda: any(partial.glob("*.safetensors")))
    with pytest.raises(KeyboardInterrupt):
        run_demo(config)  # killed once the stage's first piece (its StereoSet sentences) is stored
    assert [p.name for p in partial.glob("*.safetensors")] == ["stereoset-00000.safetensors"]
    monkeypatch.chdir(first / "sub")
    counting = scorer(monkeypatch)
    results = run_demo(replace(config, out="../b"), resume=True)
    # left to score: gender-swapped and perplexity of the stage, then (evaluate_after) the merged model's three
    assert len(counting.calls) == rescored
    assert results["merged"]["path"] == str(Path("../b/merged")) and (first / "b" / "results.json").is_file()
