"""The fake Hub server answers the real ``huggingface_hub`` client the way the Hub does."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

from fake_hub_server import git_blob_oid, hub_url_path
from hub_client import run_client


def test_upload_download_round_trip_through_the_real_client(hub, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\ntags:\n- demo\nlibrary_name: peft\n---\n# Card\n")
    (folder / "config.json").write_text('{"a": 1}')
    weights = bytes(range(256)) * 64  # binary: goes through the LFS batch API
    (folder / "sub" / "weights.safetensors").write_bytes(weights)

    result = run_client(hub, tmp_path / "home", f"""
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download, ModelCard
        from huggingface_hub.errors import RepositoryNotFoundError, EntryNotFoundError, RevisionNotFoundError
        api = HfApi()
        url = api.create_repo("org/demo", exist_ok=False)
        again = api.create_repo("org/demo", exist_ok=True)
        info = api.upload_folder(repo_id="org/demo", folder_path={str(folder)!r}, commit_message="first")
        model = api.model_info("org/demo")
        tree = sorted((f.path, f.size, f.lfs is not None) for f in api.list_repo_tree("org/demo", recursive=True)
                      if hasattr(f, "size"))
        top = sorted(f.path for f in api.list_repo_tree("org/demo"))
        paths = sorted(f.path for f in api.get_paths_info("org/demo", ["config.json", "sub", "nope"]))
        weights_path = hf_hub_download("org/demo", "sub/weights.safetensors")
        snapshot = snapshot_download("org/demo")
        import os
        errors = {{}}
        for name, call in [
            ("missing_repo", lambda: hf_hub_download("org/missing", "config.json")),
            ("missing_file", lambda: hf_hub_download("org/demo", "nope.json")),
            ("missing_revision", lambda: hf_hub_download("org/demo", "config.json", revision="0" * 40)),
            ("missing_info", lambda: api.model_info("org/missing")),
        ]:
            try:
                call()
                errors[name] = None
            except Exception as error:
                errors[name] = [type(error).__name__, isinstance(error, RepositoryNotFoundError),
                                isinstance(error, EntryNotFoundError), isinstance(error, RevisionNotFoundError)]
        second = api.upload_file(repo_id="org/demo", path_or_fileobj=b'{{"a": 2}}', path_in_repo="config.json")
        unchanged = api.upload_folder(repo_id="org/demo", folder_path={str(folder)!r}, allow_patterns=["sub/*"])
        config_now = open(hf_hub_download("org/demo", "config.json")).read()
        config_first = open(hf_hub_download("org/demo", "config.json", revision=info.oid)).read()
        emit({{
            "url": str(url), "again": str(again), "commit": info.oid, "sha": model.sha,
            "siblings": sorted(s.rfilename for s in model.siblings), "tags": model.tags,
            "library_name": model.library_name, "card_tags": model.card_data.tags,
            "tree": tree, "top": top, "paths": paths,
            "weights": open(weights_path, "rb").read().hex(),
            "snapshot": sorted(os.path.relpath(os.path.join(d, f), snapshot)
                               for d, _, fs in os.walk(snapshot) for f in fs),
            "errors": errors, "second": second.oid, "unchanged": unchanged.oid,
            "config_now": config_now, "config_first": config_first,
        }})
    """)

    assert result["url"] == f"{hub.endpoint}/org/demo" == result["again"]
    assert result["sha"] == result["commit"] == hub.commits("org/demo")[1].oid
    assert result["siblings"] == [".gitattributes", "README.md", "config.json", "sub/weights.safetensors"]
    assert result["tags"] == ["demo"] and result["card_tags"] == ["demo"] and result["library_name"] == "peft"
    assert ["sub/weights.safetensors", len(weights), True] in result["tree"]
    assert ["config.json", 8, False] in result["tree"]
    assert result["top"] == [".gitattributes", "README.md", "config.json", "sub"]
    assert result["paths"] == ["config.json", "sub"]
    assert bytes.fromhex(result["weights"]) == weights
    assert set(result["snapshot"]) >= {"README.md", "config.json", "sub/weights.safetensors"}
    # the big binary went through LFS, the small text files inline in the commit
    log = hub.state.request_log
    assert ("PUT", f"/__lfs__/{hashlib.sha256(weights).hexdigest()}") in log
    assert ("POST", "/org/demo.git/info/lfs/objects/batch") in log
    # errors are huggingface_hub's own classes
    assert result["errors"]["missing_repo"][1] is True
    assert result["errors"]["missing_info"][1] is True
    assert result["errors"]["missing_file"][2] is True
    assert result["errors"]["missing_revision"][3] is True
    # a second commit updates main; the first stays reachable by its oid; an unchanged upload adds nothing
    assert result["config_now"] == '{"a": 2}' and result["config_first"] == '{"a": 1}'
    assert result["unchanged"] == result["second"] != result["commit"]
    assert len(hub.commits("org/demo")) == 3


def test_resolve_headers_and_ranges_over_raw_http(hub):
    hub.create_repo({"name": "raw", "organization": "org"})
    content = b'{"hello": "world"}'
    hub.commit("model", "org/raw", "main", [
        {"key": "header", "value": {"summary": "add"}},
        {"key": "file", "value": {"path": "a.json", "encoding": "base64",
                                  "content": __import__("base64").b64encode(content).decode()}},
    ])
    url = hub.endpoint + hub_url_path("org/raw", "a.json")
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
        assert response.headers["ETag"] == f'"{git_blob_oid(content)}"'
        assert response.headers["X-Repo-Commit"] == hub.commits("org/raw")[-1].oid
        assert int(response.headers["Content-Length"]) == len(content)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=2-6"})) as response:
        assert response.status == 206 and response.read() == content[2:7]
    try:
        urllib.request.urlopen(hub.endpoint + hub_url_path("org/raw", "b.json"))
    except urllib.error.HTTPError as error:
        assert error.code == 404 and error.headers["X-Error-Code"] == "EntryNotFound"
    else:
        raise AssertionError("a missing file must answer 404")
    # git blob ids are git's: `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_oid(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_validate_yaml_rejects_bad_metadata(hub):
    def post(content: str) -> tuple[int, dict]:
        request = urllib.request.Request(hub.endpoint + "/api/validate-yaml", method="POST",
                                         data=json.dumps({"content": content, "repoType": "model"}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    assert post("---\ntags: [a]\n---\ntext")[0] == 200
    status, body = post("---\nmodel-index: {name: x}\n---\n")
    assert status == 400 and "model-index" in body["errors"][0]["message"]
    assert post("---\ntags: [a\n---\n")[0] == 400
    assert post("no metadata")[1]["warnings"]
