"""Push adapters and editors to a real (in-memory) Hub over HTTP and load them back by repo id.

Every client runs in a fresh process with ``HF_ENDPOINT`` pointing at the Hub double and its own empty
``HF_HOME`` (see ``hub_client.py``), so loading really goes through downloads.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

import biasedit_peft
from biasedit_peft import BiasEditConfig, set_deltas
from biasedit_peft.models import load_model

from factories import SENTENCES, random_low_rank, save_word_model
from hub_client import run_client

METRICS_BEFORE = {"stereoset": {"gender": {"ss": 63.0, "lms": 91.0, "icat": 67.34, "n": 12}}, "perplexity": 30.5}
METRICS_AFTER = {"stereoset": {"gender": {"ss": 50.5, "lms": 90.0, "icat": 89.1, "n": 12}}, "perplexity": 30.9}

PUSH_ADAPTER = """
    import json, biasedit_peft
    from peft import PeftModel
    from biasedit_peft.models import load_model
    from biasedit_peft.sharing import push_adapter_to_hub
    model = PeftModel.from_pretrained(load_model({base!r}), {adapter!r})
    url = push_adapter_to_hub(model, "org/debiased", metrics_before=json.loads({before!r}),
                              metrics_after=json.loads({after!r}), command="biasedit debias --model tiny")
    emit({{"url": url}})
"""

PULL_ADAPTER = """
    import biasedit_peft
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    from peft import PeftModel
    from biasedit_peft.models import load_model_and_tokenizer
    from biasedit_peft.scoring import score_sentences
    base, tokenizer = load_model_and_tokenizer({base!r})
    model = PeftModel.from_pretrained(base, "org/debiased")
    scores = score_sentences(model, tokenizer, {sentences!r}).sum.tolist()
    card = ModelCard.load("org/debiased")
    errors = {{}}
    try:
        PeftModel.from_pretrained(load_model_and_tokenizer({base!r})[0], "org/no-such-adapter")
    except Exception as error:
        chain, cause = [], error
        while cause is not None:
            chain.append(type(cause).__name__)
            cause = cause.__cause__ or cause.__context__
        errors["missing_repo"] = chain
    try:
        hf_hub_download("org/debiased", "no_such_file.json")
    except EntryNotFoundError as error:
        errors["missing_file"] = type(error).__name__
    repush = {repush!r}
    if repush is not None:  # then push another adapter to the same repo (saves starting another process)
        import json
        from biasedit_peft.sharing import push_adapter_to_hub
        other = PeftModel.from_pretrained(load_model_and_tokenizer({base!r})[0], repush)
        push_adapter_to_hub(other, "org/debiased", metrics_before=json.loads({before!r}),
                            metrics_after=json.loads({after!r}), command="biasedit debias --model tiny")
    emit({{"scores": scores, "metadata": card.data.to_dict(), "text": card.text, "errors": errors}})
"""


def make_adapter_folder(base_dir, folder, seed: int) -> torch.Tensor:
    """Save a BiasEdit adapter with random rank-2 deltas; return its sentence scores in this process."""
    from biasedit_peft.models import load_tokenizer
    from biasedit_peft.scoring import score_sentences

    peft_model = get_peft_model(load_model(str(base_dir)), BiasEditConfig(num_edit_layers=2))
    generator = torch.Generator().manual_seed(seed)
    set_deltas(peft_model, {name: random_low_rank(layer.weight_shape, 2, 0.5, generator)
                            for name, layer in biasedit_peft.edit_targets(peft_model).items()})
    peft_model.save_pretrained(folder)
    return score_sentences(peft_model, load_tokenizer(str(base_dir)), SENTENCES).sum


@pytest.mark.slow
def test_adapter_push_pull_card_and_repush(hub, tmp_path):
    base = save_word_model(tmp_path / "base")
    first_scores = make_adapter_folder(base, tmp_path / "first", seed=1)
    second_scores = make_adapter_folder(base, tmp_path / "second", seed=2)
    assert (first_scores - second_scores).abs().max() > 0.1
    common = {"base": str(base), "before": json.dumps(METRICS_BEFORE), "after": json.dumps(METRICS_AFTER)}

    pushed = run_client(hub, tmp_path / "home-push", PUSH_ADAPTER.format(adapter=str(tmp_path / "first"), **common))
    assert pushed["url"].startswith(f"{hub.endpoint}/org/debiased/commit/")
    stored = hub.files("org/debiased")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(stored)
    assert json.loads(stored["adapter_config.json"])["peft_type"] == "BIASEDIT"
    assert ("POST", "/org/debiased.git/info/lfs/objects/batch") in hub.state.request_log  # weights went by LFS

    # pull in a fresh process, then (same process) re-push the second adapter to the same repo
    pulled = run_client(hub, tmp_path / "home-pull", PULL_ADAPTER.format(
        sentences=SENTENCES, repush=str(tmp_path / "second"), **common))
    torch.testing.assert_close(torch.tensor(pulled["scores"]), first_scores, atol=1e-5, rtol=0)
    metadata = pulled["metadata"]
    assert metadata["library_name"] == "peft"  # our card survived (transformers would write 'transformers')
    assert {"peft", "biasedit", "debiasing"} <= set(metadata["tags"])
    metrics = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics["ss"] == 50.5 and metrics["ss_base"] == 63.0 and metrics["icat"] == 89.1
    assert "| SS (gender) | 63.00 | 50.50 | -12.50 |" in pulled["text"]
    assert "biasedit debias --model tiny" in pulled["text"]
    assert "RepositoryNotFoundError" in pulled["errors"]["missing_repo"]
    assert pulled["errors"]["missing_file"] == "RemoteEntryNotFoundError"

    # the re-push made a new commit, and a fresh download gets the new deltas
    assert len(hub.commits("org/debiased")) == 3
    repulled = run_client(hub, tmp_path / "home-pull-2", PULL_ADAPTER.format(sentences=SENTENCES, repush=None,
                                                                            **common))
    torch.testing.assert_close(torch.tensor(repulled["scores"]), second_scores, atol=1e-5, rtol=0)


EDITOR_PUSH_PULL = """
    import hashlib, torch, biasedit_peft
    from huggingface_hub import ModelCard
    from peft import get_peft_model
    from biasedit_peft import BiasEditConfig, BiasEditor
    from biasedit_peft.models import load_model
    from biasedit_peft.sharing import editor_model_card, push_folder_to_hub
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model({base!r}), BiasEditConfig(num_edit_layers=2))
    editor = BiasEditor.for_model(peft_model, rank=4)
    for parameter in editor.parameters():
        torch.nn.init.normal_(parameter)  # not a fresh init: the round trip must carry the values
    phase = {phase!r}
    def digest(module):
        return {{k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
                for k, v in module.state_dict().items()}}
    if phase == "push":
        url = editor.push_to_hub("org/editor")
        folder = {folder!r}
        editor.save_pretrained(folder)
        card = editor_model_card(base_model=None, target_modules=list(editor.config.targets),
                                 repo_id="org/editor-with-card", training_data="stereoset:gender",
                                 splits={{"train": 10, "dev": 2}},
                                 metrics_after={{"stereoset": {{"gender": {{"ss": 51.0}}}}}})
        url2 = push_folder_to_hub(folder, "org/editor-with-card", card=card)
        emit({{"url": url, "url2": url2, "digest": digest(editor)}})
    else:
        loaded = BiasEditor.from_pretrained("org/editor")
        other = BiasEditor.from_pretrained("org/editor-with-card")
        card = ModelCard.load("org/editor-with-card")
        own = ModelCard.load("org/editor")  # the card BiasEditor.push_to_hub wrote (save_pretrained's)
        emit({{"digest": digest(loaded), "digest2": digest(other), "config": loaded.config.targets,
              "tags": card.data.tags, "ss": card.data.eval_results[0].metric_value,
              "own_tags": own.data.tags, "own_loads_by_id": 'BiasEditor.from_pretrained("org/editor")' in own.text}})
"""


@pytest.mark.slow
def test_editor_push_pull_identical(hub, tmp_path):
    base = str(save_word_model(tmp_path / "base"))
    pushed = run_client(hub, tmp_path / "home-push",
                        EDITOR_PUSH_PULL.format(base=base, phase="push", folder=str(tmp_path / "editor")))
    pulled = run_client(hub, tmp_path / "home-pull",
                        EDITOR_PUSH_PULL.format(base=base, phase="pull", folder=str(tmp_path / "editor")))
    assert pushed["digest"] == pulled["digest"] == pulled["digest2"]
    assert set(pulled["config"]) == {"transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"}
    assert "biasedit-editor" in pulled["tags"] and pulled["ss"] == 51.0
    assert {"biasedit", "debiasing", "model-editing"} <= set(pulled["own_tags"]) and pulled["own_loads_by_id"]


CLI_PUSH_PULL = """
import torch
from biasedit_peft.cli import main
from biasedit_peft.editor import BiasEditor
from biasedit_peft.tuner.deltas import get_deltas
from peft import PeftModel
from transformers import AutoModelForCausalLM
common = ["--model", {base!r}, "--limit", "6", "--quiet"]
assert main(["train-editor", *common, "--out", {editor!r}, "--preset", "testbed", "--rank", "8", "--n-edits", "3",
             "--batch-size", "3", "--max-steps", "2", "--num-edit-layers", "2", "--eval-data", "none",
             "--push-to-hub", "me/cli-editor"]) == 0
assert main(["debias", *common, "--editor", "me/cli-editor", "--out", {adapter!r},
             "--push-to-hub", "me/cli-adapter"]) == 0
pulled_editor = BiasEditor.from_pretrained("me/cli-editor")
local_editor = BiasEditor.from_pretrained({editor!r})
same_editor = all(torch.equal(a, b) for a, b in zip(pulled_editor.state_dict().values(),
                                                   local_editor.state_dict().values()))
remote = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "me/cli-adapter")
local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r})
same_adapter = all(torch.equal(get_deltas(remote)[n], d) for n, d in get_deltas(local).items())
from huggingface_hub import ModelCard
card = ModelCard.load("me/cli-editor").text  # the provenance survives the reload before the push
emit({{"same_editor": same_editor, "same_adapter": same_adapter, "n": len(get_deltas(remote)),
      "card": ["biasedit train-editor --model" in card, "- Training data: `stereoset:train (bias types gender, "
               "race, religion; first 6 samples of each bias type)`" in card, "- train: `18`" in card,
               "--max-steps 2" in card]}})
"""


@pytest.mark.slow
def test_cli_push_to_hub_for_editor_and_adapter(hub, tmp_path):
    base = str(save_word_model(tmp_path / "base"))
    result = run_client(hub, tmp_path / "home", CLI_PUSH_PULL.format(
        base=base, editor=str(tmp_path / "editor"), adapter=str(tmp_path / "adapter")))
    assert result == {"same_editor": True, "same_adapter": True, "n": 2, "card": [True, True, True, True]}


TAMPER_AND_PULL = """
    import torch, biasedit_peft
    from huggingface_hub import HfApi
    from safetensors.torch import load_file, save
    from biasedit_peft.models import load_model
    from biasedit_peft.sharing.adapter_files import AdapterFileError, load_biasedit_adapter
    tensors = load_file({weights!r})
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * float("nan")  # a weights file changed on the Hub, the manifest left alone
    HfApi().upload_file(path_or_fileobj=save(tensors), path_in_repo="adapter_model.safetensors",
                        repo_id="org/debiased", commit_message="tamper")
    try:
        load_biasedit_adapter(load_model({base!r}), "org/debiased")
        emit({{"error": None}})
    except AdapterFileError as error:
        emit({{"error": str(error)}})
"""


@pytest.mark.slow
def test_a_weights_file_tampered_with_on_the_hub_is_refused_on_pull(hub, tmp_path):
    import hashlib

    base = save_word_model(tmp_path / "base")
    make_adapter_folder(base, tmp_path / "first", seed=1)
    common = {"base": str(base), "before": json.dumps(METRICS_BEFORE), "after": json.dumps(METRICS_AFTER)}
    run_client(hub, tmp_path / "home-push", PUSH_ADAPTER.format(adapter=str(tmp_path / "first"), **common))
    stored = hub.files("org/debiased")
    manifest = json.loads(stored["manifest.json"])
    assert manifest["adapter_model.safetensors"] == hashlib.sha256(stored["adapter_model.safetensors"]).hexdigest()
    assert "README.md" not in manifest  # the card may be edited on the Hub
    pulled = run_client(hub, tmp_path / "home-pull", TAMPER_AND_PULL.format(
        weights=str(tmp_path / "first" / "adapter_model.safetensors"), base=str(base)))
    assert pulled["error"] and "adapter_model.safetensors does not match its sha256" in pulled["error"]
