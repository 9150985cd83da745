"""Bad command-line input gets one clean ``error:`` line naming the path, option or file (exit 2), and LoRA adapters
load in ``biasedit evaluate --adapter``."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model

import biasedit_peft
from biasedit_peft import BiasEditConfig, set_deltas
from biasedit_peft.cli import main
from biasedit_peft.evaluation import evaluate_perplexity
from biasedit_peft.models import ModelNotFoundError, load_model, load_model_and_tokenizer, require_local_or_hub

from factories import random_low_rank

FAST = ["--limit", "2", "--n-resamples", "0", "--quiet"]
TEXT = ["The doctor read the chart before lunch.", "A small boat crossed the lake at dawn."]


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines a command printed to stderr."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def refused(argv: list[str], capsys) -> str:
    """Run ``biasedit ARGV``, check it exits 2 with exactly one ``error:`` line, and return that line."""
    code = main(argv)
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, (code, lines)
    return lines[0]


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything downloads from the Hub."""
    import huggingface_hub

    def forbidden(*args, **kwargs):
        raise AssertionError(f"Hub download attempted: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "neutral.txt"
    path.write_text("\n\n".join(TEXT) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def biasedit_adapter(tmp_path_factory) -> Path:
    """A BiasEdit adapter on the testbed model whose rank-3 deltas move its scores."""
    peft_model = get_peft_model(load_model("testbed"), BiasEditConfig(num_edit_layers=2))
    generator = torch.Generator().manual_seed(3)
    set_deltas(peft_model, {name: torch.matmul(*random_low_rank(layer.weight_shape, 3, 0.3, generator))
                            for name, layer in biasedit_peft.edit_targets(peft_model).items()})
    folder = tmp_path_factory.mktemp("biasedit") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


def evaluate_json(tmp_path: Path, name: str, text_file: Path, *extra: str) -> dict:
    """``biasedit evaluate --model testbed`` on StereoSet gender (2 items) and ``text_file``: its JSON result."""
    out = tmp_path / f"{name}.json"
    assert main(["evaluate", "--model", "testbed", "--benchmark", "stereoset", "--bias-types", "gender",
                 "--perplexity-text", str(text_file), "--json", str(out), *FAST, *extra]) == 0
    return json.loads(out.read_text())


# ----- 1. LoRA adapters in evaluate --adapter ---------------------------------------------------------------
def test_evaluate_scores_an_exported_lora_like_its_biasedit_adapter(biasedit_adapter, text_file, tmp_path):
    lora = tmp_path / "lora"
    assert main(["export-lora", "--model", "testbed", "--adapter", str(biasedit_adapter), "--out", str(lora),
                 "--quiet"]) == 0
    assert json.loads((lora / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = evaluate_json(tmp_path, "base", text_file)
    edited = evaluate_json(tmp_path, "biasedit", text_file, "--adapter", str(biasedit_adapter))
    exported = evaluate_json(tmp_path, "lora", text_file, "--adapter", str(lora))
    assert exported["adapter"] == str(lora)
    assert abs(edited["perplexity"] / base["perplexity"] - 1) > 1e-3  # the adapter changes the model
    assert exported["perplexity"] == pytest.approx(edited["perplexity"], rel=1e-4)  # the export is exact
    assert exported["stereoset"]["gender"]["ss"] == edited["stereoset"]["gender"]["ss"]


def test_evaluate_scores_a_plain_peft_lora_like_the_merged_model(text_file, tmp_path):
    torch.manual_seed(0)
    lora_model = get_peft_model(load_model("testbed"), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True,
                                                                   init_lora_weights=False))
    lora_model.save_pretrained(tmp_path / "lora")
    _, tokenizer = load_model_and_tokenizer("testbed")
    merged = evaluate_perplexity(lora_model.merge_and_unload().eval(), tokenizer, text_file)
    base = evaluate_json(tmp_path, "base", text_file)["perplexity"]
    scored = evaluate_json(tmp_path, "lora", text_file, "--adapter", str(tmp_path / "lora"))["perplexity"]
    assert abs(merged / base - 1) > 1e-3
    assert scored == pytest.approx(merged, rel=1e-4)


@pytest.mark.parametrize("made_for", [{"n_layer": 8}, {"n_embd": 96}])
def test_a_lora_made_for_another_model_is_refused_not_partly_loaded(tmp_path, capsys, made_for):
    """A LoRA of a deeper model (peft drops the tensors of blocks the testbed lacks) or a wider one (shapes that do
    not fit): one line naming the adapter, not scores of a partly applied adapter or a traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from biasedit_peft.models import TESTBED_PATH

    config = AutoConfig.from_pretrained(TESTBED_PATH, **made_for)
    other = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))
    other.save_pretrained(tmp_path / "lora")
    line = refused(["evaluate", "--model", "testbed", *FAST, "--adapter", str(tmp_path / "lora")], capsys)
    assert line.startswith(f"error: {tmp_path / 'lora'}")
    assert ("does not fit the model (the model has no place for" in line if "n_layer" in made_for
            else "its weights do not load onto this model" in line)


# ----- 2. paths that are neither local nor Hub ids ----------------------------------------------------------
@pytest.mark.parametrize(("text", "local"), [("./no/such/folder", True), ("/abs/x", True), ("~/x", True),
                                             ("a/b/c", True), ("org/name", False), ("gpt2", False)])
def test_local_looking_paths(text, local):
    """A name that does not exist is a Hub id to fetch (False) only when it can be one; a local-looking path is
    refused before any Hub call."""
    if local:
        with pytest.raises(ModelNotFoundError, match=f"--model {re.escape(text)}: no such folder"):
            require_local_or_hub(text, "--model")
    else:
        assert require_local_or_hub(text, "--model") is False


def test_a_missing_model_folder_is_refused_before_the_hub(capsys):
    line = refused(["evaluate", "--model", "./no/such/folder", *FAST], capsys)
    assert line == "error: --model ./no/such/folder: no such folder, and not a Hub model id"


def test_a_missing_gguf_file_is_refused_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    line = refused(["evaluate", "--model", str(missing), *FAST], capsys)
    assert line == f"error: --model {missing}: GGUF file not found: {missing}"


def test_a_missing_adapter_folder_is_refused_before_the_hub(no_hub, capsys):
    line = refused(["evaluate", "--model", "testbed", "--adapter", "no_such_dir", *FAST], capsys)
    assert line == "error: --adapter no_such_dir: no such folder, and not a Hub id (org/name)"


def test_a_missing_editor_folder_is_refused_before_the_hub(no_hub, tmp_path, capsys):
    line = refused(["debias", "--model", "testbed", "--editor", "no_such_dir", "--out", str(tmp_path / "out"),
                    "--calibrate-on", "none", "--limit", "2", "--quiet"], capsys)
    assert line == "error: --editor no_such_dir: no such folder, and not a Hub id (org/name)"


@pytest.mark.parametrize("gguf", [None, "model.Q4_0.gguf"])
def test_a_model_folder_without_config_json_is_refused_naming_it(tmp_path, capsys, gguf):
    """Not transformers' 'Unrecognized model in ...', which names neither the option nor what is missing."""
    if gguf:
        (tmp_path / gguf).write_bytes(b"GGUF")
    line = refused(["evaluate", "--model", str(tmp_path), *FAST], capsys)
    hint = f"; to load its GGUF file, pass --model {tmp_path / gguf}" if gguf else ""
    assert line == (f"error: --model {tmp_path}: no config.json in the folder {tmp_path}, so it is not a transformers "
                    f"model folder{hint}")


def http_library():
    """The HTTP library huggingface_hub is on: httpx2 (2.x), else httpx."""
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    pytest.skip("huggingface_hub is on neither httpx2 nor httpx")


class HubClient:
    """Stands in for huggingface_hub's HTTP client: every call of a method (``get``, ``head``, ``request``, ...) is
    recorded in ``calls`` and answered by ``answer(*args)``, a response or an exception it raises."""

    def __init__(self, answer: Callable):
        self.answer = answer
        self.calls: list[tuple[str, ...]] = []

    def __getattr__(self, method: str) -> Callable:
        def call(*args, **kwargs):
            self.calls.append((method, *map(str, args)))
            return self.answer(*args)

        return call


def unreachable(*args):
    """What the client raises without a route to the Hub."""
    raise http_library().ConnectError("[Errno -2] Name or service not known")


def no_such_repo(url, *args):
    """The Hub's answer for a repo it does not have."""
    http = http_library()
    return http.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=http.Request("GET", str(url)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty local Hub cache, online mode, and no network: returns the cache folder."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


def use_client(monkeypatch, answer: Callable) -> HubClient:
    """Make ``HubClient(answer)`` the client every huggingface_hub request goes through."""
    import huggingface_hub.utils._http

    client = HubClient(answer)
    monkeypatch.setattr(huggingface_hub.utils._http, "_GLOBAL_CLIENT", client)
    return client


@pytest.mark.parametrize(("answer", "offline", "cause"), [
    (unreachable, False, "the Hub cannot be reached: [Errno -2] Name or service not known"),
    (no_such_repo, False,
     "the Hub has no model nosuchuser/nosuchmodel (or it is private: log in with `hf auth login`)"),
    (unreachable, True, "HF_HUB_OFFLINE is set, so the Hub was not asked"),
])
def test_a_hub_model_neither_cached_nor_on_the_hub_is_refused_after_one_request(hub_cache, monkeypatch, capsys,
                                                                                 answer, offline, cause):
    """Not after transformers' retries with back-off (57 s without a route to the Hub): one request, none offline."""
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def slow_path(*args, **kwargs):
        raise AssertionError(f"transformers asked to fetch {args}")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", slow_path)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", slow_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    client = use_client(monkeypatch, answer)
    line = refused(["evaluate", "--model", "nosuchuser/nosuchmodel", *FAST], capsys)
    assert line == (f"error: --model nosuchuser/nosuchmodel: not a local folder, not in the local Hub cache "
                    f"({hub_cache}), and {cause}")
    about_it = [call for call in client.calls if "nosuchuser" in " ".join(call)]  # not huggingface_hub's telemetry
    asked = f"{huggingface_hub.constants.ENDPOINT}/api/models/nosuchuser/nosuchmodel"
    assert about_it == ([] if offline else [("get", asked)])
    assert not offline or client.calls == []


def cache_testbed_as(hub_cache: Path, repo_id: str) -> None:
    """Put the bundled testbed's files in the local Hub cache as model ``repo_id``'s ``main`` revision."""
    from biasedit_peft.models import TESTBED_PATH

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for file in TESTBED_PATH.iterdir():
        (snapshot / file.name).symlink_to(file)


@pytest.mark.parametrize(("answer", "offline"), [(unreachable, False), (no_such_repo, False), (unreachable, True)])
def test_a_cached_hub_model_loads_from_the_cache_where_the_hub_does_not_answer(hub_cache, monkeypatch, answer,
                                                                                 offline):
    """A Hub id in the local Hub cache, with no route to the Hub (or offline, or gone from it), loads from the cache
    after one request per class (none offline), not after transformers' retries for every file, and keeps its id
    as ``name_or_path``."""
    import huggingface_hub.constants

    cache_testbed_as(hub_cache, "someorg/tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    client = use_client(monkeypatch, answer)
    model, tokenizer = load_model_and_tokenizer("someorg/tiny")
    about_it = [call for call in client.calls if "someorg" in " ".join(call)]
    asked = ("get", f"{huggingface_hub.constants.ENDPOINT}/api/models/someorg/tiny")
    assert about_it == ([] if offline else [asked, asked])  # the model, then its tokenizer
    assert model.name_or_path == "someorg/tiny" and tokenizer("a doctor").input_ids


def test_a_cached_hub_model_goes_through_transformers_where_the_hub_has_it(hub_cache, monkeypatch):
    """Where the Hub answers that it has the model, transformers loads it as it would (it checks the cache for a newer
    revision): not pinned to the cache with ``local_files_only``."""
    from transformers import AutoModelForCausalLM

    http = http_library()
    cache_testbed_as(hub_cache, "someorg/tiny")
    use_client(monkeypatch, lambda url, *args: http.Response(200, json={"id": "someorg/tiny"},
                                                             request=http.Request("GET", str(url))))
    seen: list[dict] = []

    def record(*args, **kwargs):
        seen.append(kwargs)
        raise OSError("recorded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(ModelNotFoundError, match="not loadable from the Hub: recorded"):
        load_model_and_tokenizer("someorg/tiny")
    assert len(seen) == 1 and "local_files_only" not in seen[0] and "adapter_kwargs" not in seen[0]


# ----- 3. --device ------------------------------------------------------------------------------------------
def test_a_device_that_is_not_one_is_refused(capsys):
    line = refused(["evaluate", "--model", "testbed", "--device", "gpu0", *FAST], capsys)
    assert line == "error: --device gpu0: not a torch device (e.g. cpu, cuda, cuda:1, mps)"


def test_cuda_on_a_cpu_only_torch_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    line = refused(["evaluate", "--model", "testbed", "--device", "cuda", *FAST], capsys)
    assert line == "error: --device cuda: this torch has no CUDA (a CPU-only build); use --device cpu"


# ----- 4. --n-resamples -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_negative_resamples_or_a_limit_below_1_are_refused_at_once(capsys, tmp_path, monkeypatch, command):
    import biasedit_peft.models as models

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model_and_tokenizer", loaded)
    out = ["--out", str(tmp_path / "d")] if command == "demo" else []
    line = refused([command, "--model", "testbed", "--limit", "2", "--quiet", "--n-resamples", "-5", *out], capsys)
    assert line == "error: --n-resamples must be 0 (no confidence intervals) or more, got -5"
    if command == "demo":
        line = refused([command, "--limit", "0", "--quiet", *out], capsys)
        assert line == "error: --limit must be at least 1, got 0"
        assert not (tmp_path / "d").exists()


# ----- 5. broken adapter folders ----------------------------------------------------------------------------
def broken_adapter(source: Path, folder: Path, case: str) -> Path:
    """A copy of adapter ``source`` at ``folder`` whose adapter_config.json is broken as ``case`` says."""
    shutil.copytree(source, folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if case == "not json":
        config_path.write_text('{"peft_type": ')
    elif case == "no peft_type":
        del config["peft_type"]
        config_path.write_text(json.dumps(config))
    elif case == "FOO":
        config_path.write_text(json.dumps(config | {"peft_type": "FOO"}))
    else:
        config_path.unlink()
    return folder


EXPECTED = {
    "not json": "error: {config}: not valid JSON (Expecting value: line 1 column 15 (char 14))",
    "no peft_type": "error: {config} has no 'peft_type' (e.g. \"BIASEDIT\" or \"LORA\"): not a PEFT adapter config",
    "FOO": "error: {config}: unknown peft_type 'FOO'; this peft knows {known} types, e.g. BIASEDIT, LORA, IA3",
    "no config": "error: {folder} has no adapter_config.json: not a PEFT adapter folder",
}


@pytest.mark.parametrize("command", ["merge", "export-lora", "evaluate"])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_broken_adapter_configs_are_refused_naming_the_file(biasedit_adapter, tmp_path, no_hub, capsys, command,
                                                           case):
    from biasedit_peft.sharing.adapter_files import known_peft_types

    folder = broken_adapter(biasedit_adapter, tmp_path / "broken", case)
    extra = {"merge": ["--out", str(tmp_path / "out")], "export-lora": ["--out", str(tmp_path / "out"), "--quiet"],
             "evaluate": FAST}[command]
    line = refused([command, "--model", "testbed", "--adapter", str(folder), *extra], capsys)
    assert line == EXPECTED[case].format(config=folder / "adapter_config.json", folder=folder,
                                         known=len(known_peft_types()))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "export-lora"])
def test_a_lora_given_to_a_biasedit_only_command_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                                    command):
    import biasedit_peft.models as models
    import biasedit_peft.sharing.merge as merge

    get_peft_model(load_model("testbed"), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True)
                   ).save_pretrained(tmp_path / "lora")

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was refused")

    monkeypatch.setattr(models, "load_model", loaded)  # export-lora imports it when called
    monkeypatch.setattr(merge, "load_model", loaded)  # merge imported it with its module
    extra = ["--quiet"] if command == "export-lora" else []
    line = refused([command, "--model", "testbed", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "o"),
                    *extra], capsys)
    assert line == f"error: {tmp_path / 'lora'} is a LORA adapter, not a BiasEdit adapter (peft_type BIASEDIT)"
    assert not (tmp_path / "o").exists()


# ----- 6. CrowS-Pairs bias types ----------------------------------------------------------------------------
def test_an_unknown_crows_bias_type_is_refused_naming_the_available_ones(capsys):
    line = refused(["evaluate", "--model", "testbed", "--benchmark", "crows", "--bias-types", "gendr", *FAST],
                   capsys)
    assert line.startswith("error: --bias-types: unknown bias type(s) ['gendr']; CrowS-Pairs has race-color, gender, ")
    assert "(StereoSet's race is its race-color)" in line


def test_profession_alone_is_refused_for_crows(capsys):
    line = refused(["evaluate", "--model", "testbed", "--benchmark", "crows", "--bias-types", "profession", *FAST],
                   capsys)
    assert line.startswith("error: --bias-types profession: CrowS-Pairs has none of them (it has no profession)")


def test_crows_keeps_the_race_mapping_and_skips_profession_beside_stereoset(text_file, tmp_path):
    out = tmp_path / "crows.json"
    assert main(["evaluate", "--model", "testbed", "--benchmark", "crows", "--bias-types", "race",
                 "--perplexity-text", str(text_file), "--json", str(out), *FAST]) == 0
    assert list(json.loads(out.read_text())["crows"]) == ["race-color", "overall"]
    both = evaluate_json(tmp_path, "all", text_file)  # StereoSet alone, for comparison below
    out = tmp_path / "profession.json"
    assert main(["evaluate", "--model", "testbed", "--bias-types", "profession", "--perplexity-text", str(text_file),
                 "--json", str(out), *FAST]) == 0
    result = json.loads(out.read_text())
    assert result["crows"] == {} and list(result["stereoset"]) == ["profession", "overall"]
    assert result["perplexity"] == both["perplexity"]


# ----- 7. --benchmark against the --data file's kind --------------------------------------------------------
@pytest.mark.parametrize(("chosen", "suffix", "kind"), [("crows", ".json", "StereoSet"),
                                                        ("gender-swapped", ".json", "StereoSet"),
                                                        ("stereoset", ".csv", "CrowS-Pairs")])
def test_a_benchmark_that_does_not_match_the_data_file_is_refused(tmp_path, capsys, chosen, suffix, kind):
    data = tmp_path / f"mine{suffix}"
    data.write_text("{}" if suffix == ".json" else "sent_more,sent_less,stereo_antistereo,bias_type\n")
    line = refused(["evaluate", "--model", "testbed", "--benchmark", chosen, "--data", str(data), *FAST], capsys)
    assert line == (f"error: --data {data} is a {kind} file, but --benchmark {chosen} does not score {kind}; "
                    f"pass --benchmark {'stereoset' if suffix == '.json' else 'crows'} (or leave --benchmark out)")


@pytest.mark.parametrize("filename", [None, "adapter_model.safetensors"])
def test_a_hub_download_that_fails_is_one_error_naming_the_option_and_the_repo(monkeypatch, filename):
    import huggingface_hub

    import biasedit_peft.models
    from biasedit_peft.models import ModelNotFoundError, hub_download

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file.")

    monkeypatch.setattr(biasedit_peft.models, "why_hub_lacks_model", lambda *args, **kwargs: None)  # it answers
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    what = f"its {filename}" if filename else "it"
    with pytest.raises(ModelNotFoundError) as error:
        hub_download("org/name", "--adapter", filename)
    assert str(error.value) == (f"--adapter org/name: not a local folder, and {what} could not be fetched from the "
                                "Hub: We couldn't connect to 'https://huggingface.co' to load this file.")


@pytest.mark.parametrize("cached", [False, True])
def test_a_hub_download_where_the_hub_does_not_answer_asks_once_then_the_cache(hub_cache, monkeypatch, cached):
    """Without a route to the Hub, one request (not huggingface_hub's retries with back-off for each file); then the
    cached file, or one error naming the option, the repo, the file and why the Hub did not answer."""
    import huggingface_hub.constants

    from biasedit_peft.models import ModelNotFoundError, hub_download

    if cached:
        cache_testbed_as(hub_cache, "someorg/tiny")
    client = use_client(monkeypatch, unreachable)
    if cached:
        assert hub_download("someorg/tiny", "--adapter", "config.json").read_text().startswith("{")
    else:
        with pytest.raises(ModelNotFoundError) as error:
            hub_download("someorg/tiny", "--adapter", "config.json")
        assert str(error.value) == ("--adapter someorg/tiny: not a local folder, its config.json not in the local Hub "
                                    "cache, and the Hub cannot be reached: [Errno -2] Name or service not known")
    about_it = [call for call in client.calls if "someorg" in " ".join(call)]
    assert about_it == [("get", f"{huggingface_hub.constants.ENDPOINT}/api/models/someorg/tiny")]


@pytest.mark.parametrize("option", ["--train-limit", "--eval-limit"])
def test_sweep_layers_names_its_own_limit_option(tmp_path, capsys, option):
    line = refused(["sweep-layers", "--model", "testbed", "--out", str(tmp_path / "s"), option, "0", "--quiet"],
                   capsys)
    assert line == f"error: {option} must be at least 1, got 0"


def test_export_lora_of_an_all_zero_adapter_names_its_folder(tmp_path, capsys):
    get_peft_model(load_model("testbed"), BiasEditConfig(num_edit_layers=2)).save_pretrained(tmp_path / "zero")
    line = refused(["export-lora", "--model", "testbed", "--adapter", str(tmp_path / "zero"), "--out",
                    str(tmp_path / "lora"), "--quiet"], capsys)
    assert line == f"error: Every delta of adapter {tmp_path / 'zero'} is zero: there is nothing to export."
    assert not (tmp_path / "lora").exists()


def test_a_saved_adapter_naming_a_block_the_model_lacks_is_refused_naming_the_block(biasedit_adapter, tmp_path,
                                                                                      capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(biasedit_adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [2, 9]}))
    line = refused(["evaluate", "--model", "testbed", "--adapter", str(folder), *FAST], capsys)
    assert line == ("error: layers_to_transform=[2, 9]: the model has no block [9] with a module ending in "
                    "'mlp.c_proj'; its blocks are 0-3.")


@pytest.mark.parametrize("kind", ["jsonl", "crows"])
def test_train_editor_refuses_data_without_unrelated_sentences_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                                      kind):
    import biasedit_peft.models as models

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was refused")

    monkeypatch.setattr(models, "load_model_and_tokenizer", loaded)
    if kind == "jsonl":
        data = tmp_path / "pairs.jsonl"
        data.write_text(json.dumps({"stereotype": "a b", "anti_stereotype": "a c", "unrelated": "a d"}) + "\n"
                        + json.dumps({"stereotype": "e f", "anti_stereotype": "e g"}) + "\n")
        rows = "2"
    else:
        data = tmp_path / "pairs.csv"
        data.write_text("sent_more,sent_less,stereo_antistereo,bias_type\na b,a c,stereo,gender\n")
        rows = "1"
    line = refused(["train-editor", "--model", "testbed", "--train-data", str(data), "--eval-data", "none",
                    "--out", str(tmp_path / "e"), "--quiet"], capsys)
    assert line.startswith(f"error: --train-data {data}: row(s) {rows} have no 'unrelated' sentence")
    assert not (tmp_path / "e").exists()


def test_evaluate_reads_a_gzipped_stereoset_file_as_the_loader_does(tmp_path):
    import gzip

    from factories import STEREOSET_ROW

    rows = [STEREOSET_ROW, {**STEREOSET_ROW, "id": "x2"}]
    plain, packed = tmp_path / "rows.json", tmp_path / "rows.json.gz"
    plain.write_text(json.dumps(rows))
    packed.write_bytes(gzip.compress(json.dumps(rows).encode()))
    scores = []
    for data in (plain, packed):
        out = tmp_path / f"{data.name}.out.json"
        assert main(["evaluate", "--model", "testbed", "--data", str(data), *FAST, "--json", str(out)]) == 0
        scores.append(json.loads(out.read_text())["stereoset"])
    assert scores[0] == scores[1] and scores[0]["overall"]["n"] == 2
