"""Edit packs on the Hub: push/pull roundtrips against a local Hub-compatible server (tests/hub_server.py)."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_state_equal, random_patch, state_copy, tiny_llama
from hub_server import Fault, HubServer
from typer.testing import CliRunner

from nmke_patch.errors import HubError, InvalidPatchError, PatchMismatchError
from nmke_patch.hub import build_pack, parse_ref, pull_pack, push_pack, read_pack_json, verify_pack
from nmke_patch.patch import DELTAS_FILE, load_patch
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack

TOKEN = "hf_user_secret"
OTHER_TOKEN = "hf_other_secret"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A local Hub on 127.0.0.1 (stopped at teardown), set as the endpoint, with an isolated HF cache."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf-home"
    with HubServer(tokens={TOKEN: "user", OTHER_TOKEN: "other"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("NMKE_PATCH_HF_ENDPOINT", raising=False)
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        # huggingface_hub reads these once, at import time
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture
def two_patches(tmp_path: Path):
    """Two saved, stacked patches (b lists a as its parent) on tiny_llama, on disjoint neurons."""
    model = tiny_llama()
    a = random_patch(model, seed=1, name="capitals", indices=[0, 1, 2, 3]).save(tmp_path / "a.nmke")
    b = random_patch(model, seed=2, name="languages", indices=[10, 11, 12], parents=(a,))
    return a, b.save(tmp_path / "b.nmke")


def _ids(folder: Path) -> list[str]:
    return [e["id"] for e in read_pack_json(folder)]


def test_push_pull_roundtrip_and_apply(hub, two_patches):
    a, b = two_patches
    url = push_pack([a.path, b.path], "user/pack", token=TOKEN)
    oid = hub.repos["user/pack"].branches["main"]
    assert url.endswith(oid) and url.changed
    again = push_pack([a.path, b.path], "user/pack", token=TOKEN)  # the branch holds this pack already
    assert again == url and not again.changed and hub.repos["user/pack"].branches["main"] == oid
    for copied in (copy.deepcopy(again), pickle.loads(pickle.dumps(again))):  # a str before: still copyable
        assert copied == url and copied.changed is False
    files = hub.files("user/pack")
    assert {"pack.json", "README.md", "patches/capitals.nmke/deltas.safetensors"} <= set(files)

    folder = pull_pack("hf://user/pack")
    assert _ids(folder) == [a.id, b.id]
    assert [p.id for p in verify_pack(folder, trusted_root=folder.parent.parent)] == [a.id, b.id]
    assert [p.id for p in resolve_patches([folder])] == [a.id, b.id]  # the folder pull gives is a pack too
    card = (folder / "README.md").read_text()
    assert "library_name: nmke-patch" in card and "knowledge-editing" in card
    assert "base_model:" not in card  # "tiny" is not a Hub id
    assert "The capital of X is" in card

    model = tiny_llama()
    before = state_copy(model)
    patches = resolve_patches(["hf://user/pack"])
    assert [p.id for p in patches] == [a.id, b.id]
    stack = PatchStack.for_model(model)
    for p in patches:
        stack.apply(p)
    name = a.deltas[0].name
    assert not torch.equal(model.state_dict()[name], before[name])
    stack.unload_all()
    assert_state_equal(model, before)


def test_pull_specific_revisions(hub, two_patches, tmp_path):
    a, b = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    first = hub.repos["user/pack"].branches["main"]
    push_pack([a.path, b.path], "user/pack", token=TOKEN, revision="v2")
    alone = random_patch(tiny_llama(), seed=3, name="alone", indices=[20, 21]).save(tmp_path / "c.nmke")
    push_pack([alone.path], "user/pack@v3", token=TOKEN)  # revision in the reference
    assert not any(f.startswith("patches/capitals.nmke") for f in hub.files("user/pack", "v3"))
    assert _ids(pull_pack("hf://user/pack")) == [a.id]
    assert _ids(pull_pack("hf://user/pack@v2")) == [a.id, b.id]
    assert _ids(pull_pack("user/pack", revision="v3")) == [alone.id]
    assert _ids(pull_pack(f"hf://user/pack@{first}")) == [a.id]
    assert _ids(pull_pack("user/pack@v2", local_dir=tmp_path / "out")) == [a.id, b.id]
    with pytest.raises(HubError, match="revision 'nope' does not exist"):
        pull_pack("hf://user/pack@nope")
    with pytest.raises(HubError, match="not found"):
        pull_pack("hf://user/missing")


def test_packs_that_could_never_be_applied_are_refused_before_any_upload(hub, two_patches, tmp_path, caplog):
    a, b = two_patches
    made = random_patch(tiny_llama(), seed=4, name="foreign", indices=[5])
    other_base = {**made.manifest.base_model, "architecture": "MistralForCausalLM"}
    foreign = replace(made, manifest=replace(made.manifest, base_model=other_base))
    for sources, why in (
        ([b], "made on top of capitals .*not given"),
        ([b, a], "listed after it"),
        ([a, foreign], "different base models .*'LlamaForCausalLM' vs 'MistralForCausalLM'"),
    ):
        with pytest.raises(PatchMismatchError, match=why):
            push_pack(sources, "user/never", token=TOKEN)
        with pytest.raises(PatchMismatchError, match=why):
            build_pack(sources, tmp_path / "pack")
    assert "user/never" not in hub.repos and not (tmp_path / "pack").exists()
    # one model named two ways (a path and a name, say) is said, not refused: apply checks the weights
    named = {**made.manifest.base_model, "name_or_path": "/models/tiny"}
    renamed = replace(made, manifest=replace(made.manifest, base_model=named))
    with caplog.at_level("WARNING", logger="nmke_patch.pack"):
        build_pack([a, renamed], tmp_path / "named")
    assert "or on one model named two ways" in caplog.text and (tmp_path / "named" / "pack.json").is_file()


def test_private_pack_needs_a_token(hub, two_patches, tmp_path):
    a, _ = two_patches
    push_pack([a.path], "user/secret", private=True, token=TOKEN)
    assert hub.repos["user/secret"].private
    with pytest.raises(HubError, match="private"):
        pull_pack("hf://user/secret")  # anonymous: 401
    with pytest.raises(HubError, match="private"):
        pull_pack("hf://user/secret", token=OTHER_TOKEN)  # someone else: 404
    with pytest.raises(HubError):
        pull_pack("hf://user/secret", token="hf_wrong")
    assert _ids(pull_pack("hf://user/secret", token=TOKEN)) == [a.id]
    for where in ({}, {"local_dir": tmp_path / "secret"}):  # cached now: still refused without access
        with pytest.raises(HubError, match="private"):
            pull_pack("hf://user/secret", **where)
        with pytest.raises(HubError, match="private"):
            pull_pack("hf://user/secret", token=OTHER_TOKEN, **where)
    assert not (tmp_path / "secret").exists()
    with pytest.raises(HubError, match="push"):
        push_pack([a.path], "user/secret", token=OTHER_TOKEN)  # no write access to user/
    with pytest.raises(HubError):
        push_pack([a.path], "user/other-pack")  # no token at all


def test_offline_pull_uses_the_cache(hub, two_patches, monkeypatch):
    from huggingface_hub import constants

    a, b = two_patches
    push_pack([a.path, b.path], "user/pack", token=TOKEN)
    online = pull_pack("hf://user/pack")
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: read at call time
    assert pull_pack("hf://user/pack") == online
    assert len(hub.requests) == seen
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if set before the import
    assert pull_pack("hf://user/pack") == online
    assert [p.id for p in resolve_patches(["hf://user/pack"])] == [a.id, b.id]
    assert len(hub.requests) == seen  # nothing went over the network
    with pytest.raises(HubError, match="offline"):
        pull_pack("hf://user/pack@v9")
    with pytest.raises(HubError, match="offline"):
        push_pack([a.path], "user/pack", token=TOKEN)
    pinned = online.name  # the snapshot folder is named by its commit
    assert pull_pack(f"hf://user/pack@{pinned[:8]}") == online  # a short pin, as docs/hub.md shows it


def test_hub_outage_is_reported_not_covered_by_the_cache(hub, two_patches, tmp_path):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    pull_pack("hf://user/pack")
    hub.stop()  # the Hub goes down; HF_HUB_OFFLINE is not set
    for where in ({}, {"local_dir": tmp_path / "out"}):
        with pytest.raises(HubError, match=r"could not reach the Hub.*HF_HUB_OFFLINE=1"):
            pull_pack("hf://user/pack", **where)
    assert not (tmp_path / "out").exists()


def test_revoked_access_to_a_gated_pack_is_not_covered_by_the_cache(hub, two_patches, tmp_path):
    a, _ = two_patches
    push_pack([a.path], "user/gated", token=TOKEN)
    hub.repos["user/gated"].granted = {"other"}
    assert _ids(pull_pack("user/gated", token=OTHER_TOKEN)) == [a.id]  # granted: pulled into the cache
    hub.repos["user/gated"].granted = set()  # access revoked; the metadata stays public
    for where in ({}, {"local_dir": tmp_path / "out"}):
        with pytest.raises(HubError, match="user/gated is gated: accept its conditions"):
            pull_pack("user/gated", token=OTHER_TOKEN, **where)
    assert not (tmp_path / "out").exists()
    assert _ids(pull_pack("user/gated", token=TOKEN)) == [a.id]  # the owner still reads it


def test_pull_into_a_folder_is_all_or_nothing(hub, two_patches, tmp_path, monkeypatch):
    a, b = two_patches
    push_pack([a.path, b.path], "user/pack", token=TOKEN)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("important")
    with pytest.raises(FileExistsError, match="not the folder of an earlier pull"):  # the user's files stay
        pull_pack("user/pack", local_dir=mine)
    built = build_pack([a], tmp_path / "built")  # a pack the user built (or cloned) is theirs too
    with pytest.raises(FileExistsError, match="not the folder of an earlier pull"):
        pull_pack("user/pack", local_dir=built)
    assert [f.name for f in mine.iterdir()] == ["README.md"] and (
        mine / "README.md"
    ).read_text() == "important"
    here = tmp_path / "here"  # the folder the command runs in: never replaced under the user's feet
    here.mkdir()
    monkeypatch.chdir(here)
    for target in (".", here, tmp_path):
        with pytest.raises(FileExistsError, match="is the folder this runs in"):
            pull_pack("user/pack", local_dir=target)
        with pytest.raises(FileExistsError, match="is the folder this runs in"):
            build_pack([a], target)
    assert list(here.iterdir()) == []
    monkeypatch.chdir(tmp_path.parent)
    out = tmp_path / "out"
    assert _ids(pull_pack("user/pack", local_dir=out)) == [a.id, b.id]
    push_pack([a.path], "user/pack", token=TOKEN)
    assert _ids(pull_pack("user/pack", local_dir=out)) == [a.id]  # an earlier pull's folder: replaced whole
    assert not (out / "patches" / "languages.nmke").exists()
    with pytest.raises(FileExistsError, match=r"inside .*out, the folder of an earlier pull"):
        pull_pack("user/pack", local_dir=out / "nested" / "again")  # the next pull of out would delete it
    assert not (out / "nested").exists()
    # the same revision again comes from the cache: nothing is downloaded
    seen = len(hub.requests)
    assert _ids(pull_pack("user/pack", local_dir=out)) == [a.id]
    assert not [p for m, p in hub.requests[seen:] if m == "GET" and "/resolve/" in p]
    push_pack([a.path], "user/tampered", token=TOKEN)  # tampered on the server: never seen whole
    deltas = f"patches/capitals.nmke/{DELTAS_FILE}"
    hub.files("user/tampered")[deltas] = _flip_byte(hub.files("user/tampered")[deltas])

    def files_outside_the_cache() -> list[str]:  # the Hugging Face cache holds what it downloaded
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "hf-home" not in p.parts)

    for target in (out, tmp_path / "new"):  # a refused pack leaves the folder as it was, or nothing
        before = files_outside_the_cache()
        with pytest.raises(InvalidPatchError, match="sha256"):
            pull_pack("user/tampered", local_dir=target, revision="main")
        assert files_outside_the_cache() == before
    # offline, a folder is filled from the cache (a local_dir is not one)
    push_pack([a.path, b.path], "user/clean", token=TOKEN)
    pull_pack("user/clean")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _ids(pull_pack("user/clean", local_dir=tmp_path / "offline")) == [a.id, b.id]
    assert _ids(pull_pack("user/clean", local_dir=tmp_path / "offline")) == [a.id, b.id]  # and again


def _flip_byte(data: bytes, pos: int = -3) -> bytes:
    buf = bytearray(data)
    buf[pos] ^= 0x01
    return bytes(buf)


def test_tampered_pack_is_refused_and_nothing_applied(hub, two_patches):
    a, b = two_patches
    for repo in ("user/t1", "user/t2", "user/t3", "user/t4", "user/t5", "user/t6", "user/t7", "user/t8"):
        push_pack([a.path, b.path], repo, token=TOKEN)
    deltas = f"patches/languages.nmke/{DELTAS_FILE}"
    hub.files("user/t1")[deltas] = _flip_byte(hub.files("user/t1")[deltas])
    # consistent deltas + manifest swap: the id in pack.json no longer matches
    t2 = hub.files("user/t2")
    for fname in (DELTAS_FILE, "manifest.json"):
        t2[f"patches/capitals.nmke/{fname}"] = (Path(b.path) / fname).read_bytes()
    pack = json.loads(hub.files("user/t3")["pack.json"])
    pack["patches"][0]["path"] = "../../../../etc"
    hub.files("user/t3")["pack.json"] = json.dumps(pack).encode()
    pack = json.loads(hub.files("user/t4")["pack.json"])
    pack["format_version"] = 99
    hub.files("user/t4")["pack.json"] = json.dumps(pack).encode()
    pack = json.loads(hub.files("user/t5")["pack.json"])
    pack["patches"][1]["name"] = "harmless"
    hub.files("user/t5")["pack.json"] = json.dumps(pack).encode()
    hub.files("user/t6")["pack.json"] = b"[" * 200_000  # was a RecursionError traceback
    hub.files("user/t7")["pack.json"] = b'{"format": "nmke-pack", "format_version": 1' + b"0" * 5000 + b"}"
    pack = json.loads(hub.files("user/t8")["pack.json"])
    pack["patches"][1]["name"] = "n" * 1_000_000  # would be repeated in every message about it
    hub.files("user/t8")["pack.json"] = json.dumps(pack).encode()

    model = tiny_llama()
    before = state_copy(model)
    for repo, why in (
        ("user/t1", "sha256"),
        ("user/t2", "pack was modified"),
        ("user/t3", "not a plain relative path"),
        ("user/t4", "not supported"),
        ("user/t5", "calls it 'harmless'"),
        ("user/t6", r"hf://user/t6: pack\.json is not valid JSON \(nested more than 64 levels"),
        ("user/t7", r"hf://user/t7: pack\.json is not valid JSON \(an integer of 5001 digits"),
        ("user/t8", r"has a name of 1,000,000 characters; at most 256$"),
    ):
        with pytest.raises(InvalidPatchError, match=why):
            patches = resolve_patches([f"hf://{repo}"])
            for p in patches:  # never reached
                PatchStack.for_model(model).apply(p)
    assert_state_equal(model, before)
    assert PatchStack.for_model(model).applied == []


def test_verify_pack_refuses_links_out_of_the_pack(two_patches, tmp_path):
    a, b = two_patches
    pack = build_pack([a, b], tmp_path / "pack")
    assert [p.id for p in verify_pack(pack)] == [a.id, b.id]
    target = pack / "patches" / "capitals.nmke" / DELTAS_FILE
    target.unlink()
    target.symlink_to(Path(a.path) / DELTAS_FILE)  # same bytes, but outside the pack
    with pytest.raises(InvalidPatchError, match="link leading out"):
        verify_pack(pack)
    inner = build_pack([a], tmp_path / "inner")  # a link to a folder inside the pack: named, and refused
    (inner / "patches" / "capitals.nmke").rename(inner / "real")
    (inner / "patches" / "capitals.nmke").symlink_to(Path("..") / "real")
    with pytest.raises(
        InvalidPatchError, match=r"patches/capitals\.nmke is a link; pack\.json must name a real folder"
    ):
        verify_pack(inner)


def test_build_pack_layout_and_card(two_patches, tmp_path):
    a, b = two_patches
    c = replace(load_patch(b.path), path=None)  # an in-memory duplicate name gets a unique folder
    hub_base = {**a.manifest.base_model, "name_or_path": "HuggingFaceTB/SmolLM2-135M"}
    c = replace(c, manifest=replace(c.manifest, name="capitals", parents=[], base_model=hub_base))
    a2 = replace(load_patch(a.path), manifest=replace(a.manifest, base_model=hub_base), path=None)
    pack = build_pack([a2, c], tmp_path / "pack", repo_id="user/pack")
    data = json.loads((pack / "pack.json").read_text())
    assert data["format"] == "nmke-pack" and data["format_version"] == 1
    assert [e["path"] for e in data["patches"]] == ["patches/capitals.nmke", "patches/capitals-2.nmke"]
    card = (pack / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M" in card and "hf://user/pack" in card
    with pytest.raises(InvalidPatchError, match="more than once"):
        build_pack([a, a], tmp_path / "dup")
    single = build_pack([a2], tmp_path / "single")
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in (single / "README.md").read_text()


def test_push_with_peft_adapter(hub, two_patches):
    a, b = two_patches
    push_pack([a.path, b.path], "user/peft-pack", token=TOKEN, with_peft=True)
    files = hub.files("user/peft-pack")
    assert "peft/adapter_config.json" in files and "peft/adapter_model.safetensors" in files
    assert _ids(pull_pack("hf://user/peft-pack")) == [a.id, b.id]


def test_parse_ref():
    assert parse_ref("hf://user/pack@v2") == ("user/pack", "v2")
    assert parse_ref("user/pack") == ("user/pack", None)
    assert parse_ref("hf://user/pack@refs/pr/1") == ("user/pack", "refs/pr/1")
    for bad in ("hf://", "hf://user/../pack", "a/b/c", "hf://user/pack@", "notarepo", "hf://pack@v1"):
        with pytest.raises(HubError):
            parse_ref(bad)
    with pytest.raises(HubError, match="pass only one"):
        parse_ref("hf://user/pack@v1", "v2")


def test_cli_push_and_pull(hub, two_patches, tmp_path, monkeypatch, capsys, caplog):
    from nmke_patch.cli.main import app, run

    a, b = two_patches
    runner = CliRunner()
    result = runner.invoke(
        app, ["push", str(a.path), str(b.path), "user/cli-pack", "--private", "--token", TOKEN]
    )
    assert result.exit_code == 0, result.output
    assert "pushed 2 patch(es) to user/cli-pack" in result.output
    head = hub.repos["user/cli-pack"].branches["main"]
    again = runner.invoke(app, ["push", str(a.path), str(b.path), "user/cli-pack", "--token", TOKEN])
    assert again.exit_code == 0, again.output
    assert "already holds this pack of 2 patch(es), nothing pushed" in again.stdout and head in again.stdout
    caplog.set_level(logging.WARNING, logger="huggingface_hub")  # the CLI keeps it at ERROR unless -v
    assert push_pack([a.path, b.path], "user/cli-pack", token=TOKEN).changed is False
    # huggingface_hub's own notice would say it twice
    assert not [r for r in caplog.records if "No files have been modified" in r.getMessage()]
    assert hub.repos["user/cli-pack"].branches["main"] == head
    # no token, and nothing in the cache yet: refused
    monkeypatch.setattr(sys, "argv", ["nmke-patch", "pull", "user/cli-pack"])
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "private" in err and len(err.splitlines()) == 1

    out = tmp_path / "pulled"
    result = runner.invoke(app, ["pull", "hf://user/cli-pack", "-o", str(out), "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert _ids(out) == [a.id, b.id]
    assert a.id[:12] in result.stderr and result.stdout.strip() == str(out)  # dir=$(nmke-patch pull ...)
    with pytest.raises(HubError, match="looks like a commit id"):  # a branch named so would shadow the pin
        push_pack([a.path], "user/cli-pack@0123abc", token=TOKEN)
    seen = len(hub.requests)
    with pytest.raises(HubError, match="looks like a commit id"):
        push_pack([a.path], "user/cli-pack", revision="a" * 40, token=TOKEN)
    assert len(hub.requests) == seen  # refused before any request


def test_pull_of_a_pack_pushed_to_a_branch_only_names_the_branch(hub, two_patches, tmp_path):
    a, _ = two_patches
    push_pack([a.path], "user/branched", revision="v2", token=TOKEN)  # main keeps only .gitattributes
    for local_dir in (None, tmp_path / "out"):
        with pytest.raises(
            InvalidPatchError, match=r"pack.json is missing\); .*\(v2\): pull user/branched@v2"
        ):
            pull_pack("user/branched", local_dir=local_dir, token=TOKEN)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidPatchError, match=r"pack.json is missing\)$"):  # asked for main by name
        pull_pack("user/branched", revision="main", token=TOKEN)
    assert _ids(pull_pack("user/branched@v2", token=TOKEN)) == [a.id]


def test_pack_keeps_the_editing_state_of_its_patches(tmp_path: Path) -> None:
    """Patches made by `create` carry state.safetensors; a pack must copy it (its hash is in the manifest)."""
    model = tiny_llama()
    patch = replace(random_patch(model, name="with-state"), state={"keys.1": torch.randn(3, 48)})
    saved = patch.save(tmp_path / "with-state.nmke")
    pack = build_pack([saved], tmp_path / "pack")
    (pulled,) = resolve_patches([pack])
    assert pulled.id == saved.id
    assert torch.equal(pulled.state["keys.1"], patch.state["keys.1"])


def test_push_refuses_a_repository_that_is_not_a_pack(hub, two_patches):
    from huggingface_hub import HfApi

    a, _ = two_patches
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("user/my-model")
    api.upload_file(path_or_fileobj=b"# My model\n", path_in_repo="README.md", repo_id="user/my-model")
    before = dict(hub.files("user/my-model"))
    with pytest.raises(HubError, match=r"user/my-model holds files \(README.md\) and is not an edit pack"):
        push_pack([a.path], "user/my-model", token=TOKEN)
    assert hub.files("user/my-model") == before
    with pytest.raises(InvalidPatchError, match=r"pack\.json"):  # pulled, it is not taken for a pack either
        pull_pack("user/my-model", token=TOKEN)
    push_pack([a.path], "user/fresh", token=TOKEN)  # a new repository, and then the pack it now is
    push_pack([a.path], "user/fresh", token=TOKEN)


def test_pack_copies_only_a_patch_s_own_checked_files(two_patches, tmp_path):
    """A stranger's patch folder must not carry local files into a pack: its card is written anew and a
    state file its manifest does not declare is left behind, links or not."""
    a, _ = two_patches
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2\n")
    evil = tmp_path / "evil.nmke"
    shutil.copytree(a.path, evil)
    (evil / "README.md").unlink()
    (evil / "README.md").symlink_to(secret)
    (evil / "state.safetensors").symlink_to(secret)
    pack = build_pack([str(evil)], tmp_path / "pack")
    copied = pack / "patches" / "capitals.nmke"
    assert sorted(f.name for f in copied.iterdir()) == ["README.md", "deltas.safetensors", "manifest.json"]
    assert not [f for f in pack.rglob("*") if f.is_symlink()]
    assert "hunter2" not in "".join(f.read_text(errors="replace") for f in pack.rglob("*") if f.is_file())
    assert "capitals" in (copied / "README.md").read_text()


def test_a_link_that_loops_in_a_pack_is_refused_in_one_line(two_patches, tmp_path):
    a, _ = two_patches
    pack = build_pack([a], tmp_path / "pack")
    (pack / "loop").symlink_to("loop")
    with pytest.raises(InvalidPatchError, match="loop is a link that loops"):
        verify_pack(pack)


def test_a_hub_that_never_answers_times_out_in_one_line(hub, two_patches, monkeypatch):
    """huggingface_hub's API requests wait forever by default: a pull used to hang with no output."""
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    monkeypatch.setenv("NMKE_PATCH_HUB_TIMEOUT", "0.5")
    for path in (
        r"^/api/models/user/pack$",
        r"^/api/models/user/pack/revision/",
    ):  # ours, snapshot_download's
        hub.faults.append(Fault(path, hang=3.0))
        with pytest.raises(HubError, match=r"could not reach the Hub at \S+ \(ReadTimeout\)"):
            pull_pack("user/pack")
        hub.faults.clear()
    hub.faults.append(Fault(r"^/api/repos/create$", hang=3.0))
    with pytest.raises(
        HubError, match=r"\(ReadTimeout\): .*the upload may have landed all the same: push again"
    ):
        push_pack([a.path], "user/other", token=TOKEN)
    hub.faults.clear()
    for absurd in ("1e12", "0", "nan"):
        monkeypatch.setenv("NMKE_PATCH_HUB_TIMEOUT", absurd)
        with pytest.raises(HubError, match=r"greater than 0 and at most 86400"):
            pull_pack("user/pack")
    monkeypatch.setenv("NMKE_PATCH_HUB_TIMEOUT", "soon")
    with pytest.raises(HubError, match=r"NMKE_PATCH_HUB_TIMEOUT='soon': give a number of seconds"):
        pull_pack("user/pack")


def test_a_failed_request_is_not_answered_with_an_older_cached_pack(hub, two_patches, tmp_path):
    """snapshot_download answers a failed request of its own with whatever the cache holds."""
    a, b = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    pull_pack("user/pack")  # one patch, cached
    push_pack([a.path, b.path], "user/pack", token=TOKEN)
    for where in ({}, {"local_dir": tmp_path / "out"}):
        # our own repo_info (/api/models/user/pack) is answered; snapshot_download's fails, once
        hub.faults.append(Fault(r"^/api/models/user/pack/revision/", status=503, times=1))
        with pytest.raises(
            HubError, match=r"holds commit .* but served .* \(a request failed on the way, or"
        ):
            pull_pack("user/pack", **where)
        hub.faults.clear()
    assert not (tmp_path / "out").exists()
    assert _ids(pull_pack("user/pack")) == [a.id, b.id]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault(r"^/api/models/user/pack/revision/", status=200, body=b"<html>login</html>"),
         r"did not answer as the Hugging Face Hub API does \(JSONDecodeError\)"),
        (Fault(r"^/api/models/user/pack/revision/", status=200, body=b"{}"),
         r"did not answer as the Hugging Face Hub API does \(KeyError\)"),
        (Fault(r"^/api/models/user/pack/revision/", status=429),
         r"is limiting requests \(HTTP 429\): wait a minute"),
    ],
)  # fmt: skip
def test_answers_that_are_not_the_hub_api_s_are_one_line(hub, two_patches, fault, message):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    hub.faults.append(fault)
    with pytest.raises(HubError, match=message):
        pull_pack("user/pack")


def test_ids_the_hub_refuses_are_refused_first():
    for bad in ("user/a--b", "user/pack-", "user/pack.", "user/pack.git", "usér/pack"):
        with pytest.raises(HubError, match="is not an edit pack's repository id"):
            parse_ref(bad)


def test_a_pull_downloads_the_pack_s_files_only(hub, two_patches):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    repo = hub.repos["user/pack"]
    head = repo.commits[repo.branches["main"]]
    head.files["junk/big.bin"] = b"\0" * 100_000  # someone else's file in the repository
    folder = pull_pack("user/pack")
    assert not (folder / "junk").exists() and (folder / "pack.json").is_file()


@pytest.mark.parametrize("name", ["patches/../../evil.txt", "peft/../x", "patches/a\\b"])
def test_a_pack_file_whose_name_leaves_the_pack_is_refused_in_one_line(
    hub, two_patches, tmp_path, monkeypatch, capsys, name
):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    hub.files("user/pack")[name] = b"x"  # not even listed in pack.json
    with pytest.raises(InvalidPatchError, match="not a plain path inside the pack"):
        pull_pack("user/pack", local_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
    with pytest.raises(InvalidPatchError, match="not a plain path inside the pack"):  # apply, eval, ...
        resolve_patches(["hf://user/pack"])
    from nmke_patch.cli.main import run

    monkeypatch.setattr(sys, "argv", ["nmke-patch", "pull", "user/pack"])
    with pytest.raises(SystemExit) as exc:  # was huggingface_hub's ValueError, with a traceback
        run()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error:") and len(err.splitlines()) == 1


def test_a_download_damaged_on_the_way_says_how_to_recover(hub, two_patches):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    path = f"patches/capitals.nmke/{DELTAS_FILE}"
    good = hub.files("user/pack")[path]
    served = rf"^/user/pack/resolve/[^/]+/{re.escape(path)}$"
    hub.faults.append(Fault(served, method="GET", status=200, body=good[:-10], times=1))  # cut short
    with pytest.raises(HubError, match=r"was cut short .*: pull again"):
        pull_pack("user/pack")
    hub.faults.append(Fault(served, method="GET", status=200, body=_flip_byte(good), times=1))  # same size
    with pytest.raises(InvalidPatchError, match=r"sha256.* delete (\S+) and pull again\)$") as refused:
        pull_pack("user/pack")
    with pytest.raises(InvalidPatchError):  # the damaged copy stays in the cache ...
        pull_pack("user/pack")
    shutil.rmtree(re.search(r"delete (\S+) and pull again", str(refused.value)).group(1))
    assert _ids(pull_pack("user/pack")) == [a.id]  # ... until it is deleted
    push_pack([a.path], "user/badid", token=TOKEN)  # what a pack says is wrong: no copy to delete
    pack = json.loads(hub.files("user/badid")["pack.json"])
    pack["patches"][0]["id"] = "sha256:" + pack["patches"][0]["id"][7:]
    hub.files("user/badid")["pack.json"] = json.dumps(pack).encode()
    with pytest.raises(InvalidPatchError, match=r"a sha256 in 64 lowercase hex digits\)$"):
        pull_pack("user/badid")


def test_tokens_no_hub_issues_are_refused_in_one_line(hub, two_patches, monkeypatch):
    a, _ = two_patches
    with pytest.raises(HubError, match=r"the token is empty"):
        push_pack([a.path], "user/pack", token="")  # --token "$UNSET_VARIABLE"
    with pytest.raises(HubError, match=r"the token holds characters no Hub token has"):
        push_pack([a.path], "user/pack", token="hf_ü")
    monkeypatch.setenv("HF_TOKEN", "hf_ü")
    with pytest.raises(HubError, match=r"HF_TOKEN holds characters no Hub token has"):
        pull_pack("user/pack")
    monkeypatch.delenv("HF_TOKEN")
    assert push_pack([a.path], "user/pack", token=TOKEN + "\n").changed  # as read from a file


def test_answers_missing_a_file_or_its_headers_say_so(hub, two_patches):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    hub.faults.append(Fault(r"/resolve/[^/]+/patches/capitals\.nmke/manifest\.json$", status=404))
    with pytest.raises(
        HubError, match=r"a file of user/pack \(\S*patches/capitals\.nmke/manifest\.json\) is listed"
    ):
        pull_pack("user/pack")
    hub.faults[:] = [Fault(r"/resolve/", method="HEAD", status=200)]  # a proxy that drops ETag and the rest
    with pytest.raises(HubError, match=r"answered without the headers the Hub sends with a file"):
        pull_pack("user/pack")


def test_a_pull_into_a_folder_copies_the_pack_s_own_files_only(hub, two_patches, tmp_path):
    a, _ = two_patches
    push_pack([a.path], "user/pack", token=TOKEN)
    repo = hub.repos["user/pack"]
    repo.commits[repo.branches["main"]].files["patches/capitals.nmke/extra.bin"] = b"unlisted"
    out = pull_pack("user/pack", local_dir=tmp_path / "out")
    assert not (out / "patches" / "capitals.nmke" / "extra.bin").exists()
    assert sorted(f.name for f in (out / "patches" / "capitals.nmke").iterdir()) == [
        "README.md",
        "deltas.safetensors",
        "manifest.json",
    ]
