"""Attribute once, share the result: `Attributions` and `Selection` on the Hub, with the real `huggingface_hub`
client against `hub.server` over HTTP on 127.0.0.1 (as tests/test_hub.py does for deltas)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants, scan_cache_dir

import loki
from loki import errors
from loki.hub import download
from loki.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `hub/` (the test server) lives at the repo root, beside `loki/`
    sys.path.insert(0, str(ROOT))
from hub.server import HubServer  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        s.alice = s.add_user("alice")
        s.bob = s.add_user("bob")
        yield s


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    """A fresh Hugging Face cache per test; the test server speaks LFS, not Xet."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def attributions(tmp_path_factory):
    """KVA of a tiny llama on 4 token-id prompts, written to a folder as `loki attribute --out` does."""
    folder = tmp_path_factory.mktemp("kva")
    return loki.attribute(tiny_model("llama"), None, PROMPTS, steps=3, path=folder, progress=False)


def hub(server, **kw):
    return {"token": server.alice, "endpoint": server.url, **kw}


def pull_attributions(server, source, **kw):
    return loki.load_attributions(source, cache_dir=constants.HF_HUB_CACHE, **hub(server, **kw))


def pull_selection(server, source, **kw):
    return loki.load_selection(source, cache_dir=constants.HF_HUB_CACHE, **hub(server, **kw))


def same_selection(a: loki.Selection, b: loki.Selection) -> bool:
    return (
        a.rows.keys() == b.rows.keys()
        and all(torch.equal(a.rows[i], b.rows[i]) for i in a.rows)
        and (a.num_layers, a.d_out, a.strategy, a.q) == (b.num_layers, b.d_out, b.strategy, b.q)
    )


def cached_blobs(repo_id: str) -> list[str]:
    storage = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return sorted(p.name for p in (storage / "blobs").iterdir()) if (storage / "blobs").exists() else []


# -- attributions -----------------------------------------------------------------------------------
def test_attributions_round_trip_and_select_on_the_pulled_set(server, attributions):
    commit = loki.push(attributions, "alice/kva", **hub(server))
    assert "alice/kva" in server.repos
    pulled = pull_attributions(server, "alice/kva")
    assert pulled.origin == f"alice/kva@{commit.oid}"
    assert Path(constants.HF_HUB_CACHE) in pulled.path.parents  # read from the Hugging Face cache, memory-mapped
    assert isinstance(np.load(pulled.path / "attributions.npy", mmap_mode="r"), np.memmap)
    assert pulled.shape == attributions.shape == (4, 2, 32)
    assert torch.equal(pulled.values, attributions.values) and pulled.values.dtype == torch.float32
    assert torch.equal(pulled.targets, attributions.targets)
    assert torch.equal(pulled.seconds, attributions.seconds)
    assert pulled.meta == attributions.meta and pulled.meta["steps"] == 3

    for q, strategy in ((10, "layer_balanced"), (25, "global_lowest"), (10, "layer_highest")):
        theirs, ours = loki.select(pulled, q=q, strategy=strategy), loki.select(attributions, q=q, strategy=strategy)
        assert same_selection(theirs, ours)
    sel = loki.select(pulled, q=10)
    assert sel.source == f"alice/kva@{commit.oid}"  # the Hub id, not a path in someone's cache
    assert sel.extra["model"] == "tiny-random/llama-seed0" and sel.extra["prompts"] == 4


def test_attributions_in_memory_are_pushed_too(server):
    attr = loki.attribute(tiny_model("llama", seed=1), None, PROMPTS[:2], steps=2, progress=False)
    assert attr.path is None and attr.saved_at() is None
    loki.push(attr, "alice/kva-memory", **hub(server))
    pulled = pull_attributions(server, "alice/kva-memory")
    assert torch.equal(pulled.values, attr.values) and pulled.meta == attr.meta
    assert pulled.meta["model"] == "tiny-random/llama-seed1"


def test_attributions_card_names_the_base_model_and_the_run(server, attributions):
    loki.push(attributions, "alice/kva-card", license="apache-2.0", tags=["smollm2"], **hub(server))
    info = HfApi(endpoint=server.url, token=server.alice).model_info("alice/kva-card")
    card = info.card_data
    assert card["base_model"] == "tiny-random/llama-seed0" and card["library_name"] == "loki"
    assert card["tags"] == ["loki", "knowledge-implanting", "loki-attributions", "smollm2"]
    assert card["license"] == "apache-2.0"
    assert {s.rfilename for s in info.siblings} == {
        ".gitattributes",
        "README.md",
        "config.json",
        "meta.json",
        "attributions.npy",
        "targets.npy",
        "seconds.npy",
    }
    readme = download("alice/kva-card", filename="README.md", **hub(server)).read_text()
    meta = attributions.meta
    assert "| prompts | 4 (list (token ids)) |" in readme
    assert f"| prompts sha256 | `{meta['prompts_sha256']}` |" in readme
    assert "| integrated-gradient steps | 3 (" in readme and "| model dtype | float32 |" in readme
    assert f"| computed | {meta['created']} |" in readme and "| pushed | 20" in readme
    assert 'loki.load_attributions("alice/kva-card")' in readme and "loki select alice/kva-card -q 10" in readme
    marker = json.loads(download("alice/kva-card", filename="config.json", **hub(server)).read_text())
    assert marker["format"] == "loki-attributions" and marker["base_model"] == "tiny-random/llama-seed0"


def test_revisions_and_offline_after_caching(server, attributions, monkeypatch):
    api = HfApi(endpoint=server.url, token=server.alice)
    first = loki.push(attributions, "alice/kva-offline", **hub(server))
    api.create_tag("alice/kva-offline", tag="v1", revision=first.oid)
    other = loki.attribute(tiny_model("llama"), None, PROMPTS[:3], steps=2, progress=False)
    second = loki.push(other, "alice/kva-offline", **hub(server))
    assert torch.equal(pull_attributions(server, "alice/kva-offline@v1").values, attributions.values)
    latest = pull_attributions(server, "alice/kva-offline")
    assert torch.equal(latest.values, other.values) and latest.origin == f"alice/kva-offline@{second.oid}"

    server.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(pull_attributions(server, "alice/kva-offline@v1").values, attributions.values)
    assert torch.equal(pull_attributions(server, "alice/kva-offline").values, other.values)
    assert torch.equal(pull_attributions(server, f"alice/kva-offline@{first.oid}").values, attributions.values)
    with pytest.raises(errors.HubOfflineError, match="HF_HUB_OFFLINE=1"):
        pull_attributions(server, "alice/kva-never-pulled")
    assert server.count() == 0


def test_a_second_pull_downloads_nothing(server, attributions):
    commit = loki.push(attributions, "alice/kva-cached", **hub(server))
    server.clear()
    pull_attributions(server, "alice/kva-cached")
    assert server.count("GET", r"/resolve/.*\.npy$") == 3 and server.repos["alice/kva-cached"].downloads == 1
    server.clear()
    pull_attributions(server, f"alice/kva-cached@{commit.oid}")
    assert server.count() == 0


def test_corrupted_attributions_are_rejected_and_removed(server, attributions):
    loki.push(attributions, "alice/kva-corrupt", **hub(server))
    server.corrupt(r"attributions\.npy$")
    try:
        with pytest.raises(errors.HubIntegrityError, match="checksum"):
            pull_attributions(server, "alice/kva-corrupt")
    finally:
        server.clear()
    assert not [
        r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_id == "alice/kva-corrupt" and r.revisions
    ]
    assert torch.equal(pull_attributions(server, "alice/kva-corrupt").values, attributions.values)


# -- selections -------------------------------------------------------------------------------------
def test_selection_round_trip_and_card(server, attributions):
    commit = loki.push(attributions, "alice/kva-src", **hub(server))
    sel = loki.select(pull_attributions(server, "alice/kva-src"), q=10)
    loki.push(sel, "alice/q10", **hub(server))
    pulled = pull_selection(server, "alice/q10")
    assert same_selection(pulled, sel) and pulled.source == sel.source and pulled.extra == sel.extra
    assert pulled.provenance() == sel.provenance()

    card = HfApi(endpoint=server.url, token=server.alice).model_info("alice/q10").card_data
    assert card["base_model"] == "tiny-random/llama-seed0" and "loki-selection" in card["tags"]
    readme = download("alice/q10", filename="README.md", **hub(server)).read_text()
    assert "| strategy | layer_balanced |" in readme and "| q (percent of rows per layer) | 10 |" in readme
    assert "| rows per layer | 3 in each of the 2 layers |" in readme and "| prompts | 4 |" in readme
    assert f"[alice/kva-src@{commit.oid}](https://huggingface.co/alice/kva-src/tree/{commit.oid})" in readme
    assert 'loki.load_selection("alice/q10")' in readme

    model = tiny_model("llama")  # the pulled selection trains like the original
    loki.prepare(model, pulled)
    assert loki.implant.trainable_report(model).rows == sel.num_rows
    loki.unprepare(model)


def test_selection_offline_after_caching(server, monkeypatch):
    sel = loki.Selection.random(num_layers=2, d_out=32, q=10, seed=4)
    loki.push(sel, "alice/random-q10", **hub(server))
    pull_selection(server, "alice/random-q10")
    server.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert same_selection(loki.load_selection("alice/random-q10"), sel)  # no token, no endpoint: the cache answers
    assert server.count() == 0


# -- the wrong kind ---------------------------------------------------------------------------------
def test_a_repo_of_another_kind_is_a_clear_error(server, attributions):
    model = tiny_model("llama")
    loki.push(loki.testing.random_delta(model, name="d"), "alice/a-delta", **hub(server))
    loki.push(attributions, "alice/some-kva", **hub(server))
    with pytest.raises(
        errors.HubFileNotFoundError,
        match=r"holds a loki delta, not loki attributions: load it "
        r"with loki.load\('alice/a-delta'\)",
    ) as info:
        pull_attributions(server, "alice/a-delta")
    assert isinstance(info.value, errors.LokiError)
    assert not cached_blobs("alice/a-delta")  # nothing downloaded
    with pytest.raises(errors.HubFileNotFoundError, match=r"loki.load_attributions\('alice/some-kva'\)"):
        loki.load("alice/some-kva", cache_dir=constants.HF_HUB_CACHE, **hub(server))
    with pytest.raises(errors.HubFileNotFoundError, match="holds loki attributions, not a loki selection"):
        pull_selection(server, "alice/some-kva")
    HfApi(endpoint=server.url, token=server.alice).create_repo("alice/empty")
    with pytest.raises(errors.HubFileNotFoundError, match="holds no loki attributions"):
        pull_attributions(server, "alice/empty")

    commits = len(server.repos["alice/some-kva"].commits)
    with pytest.raises(errors.HubArgumentError, match="holds loki attributions; a repo holds one kind"):
        loki.push(loki.select(attributions, q=10), "alice/some-kva", **hub(server))
    with pytest.raises(errors.HubArgumentError, match="holds a loki delta"):
        loki.push(attributions, "alice/a-delta", **hub(server))
    with pytest.raises(errors.HubArgumentError, match="holds loki attributions"):
        loki.push(loki.select(attributions, q=10), "alice/some-kva", revision="v2", **hub(server))
    assert "v2" not in server.repos["alice/some-kva"].branches  # refused before the new branch was created
    assert len(server.repos["alice/some-kva"].commits) == commits  # nothing committed
    with pytest.raises(errors.HubArgumentError, match="fixed"):
        loki.push(attributions, "alice/kva-x", filename="x.loki", **hub(server))
    with pytest.raises(errors.LedgerError, match="Attributions or Selection"):
        loki.push(attributions.values, "alice/kva-x", **hub(server))
    assert "alice/kva-x" not in server.repos


def test_hub_errors_are_the_deltas_errors(server, attributions):
    loki.push(attributions, "alice/kva-private", private=True, **hub(server))
    with pytest.raises(errors.HubRepoNotFoundError, match="no local folder 'alice/kva-private' either"):
        pull_attributions(server, "alice/kva-private", token=server.bob)
    with pytest.raises(errors.HubRevisionNotFoundError):
        pull_attributions(server, "alice/kva-private@nope")
    with pytest.raises(errors.HubPermissionError):
        loki.push(attributions, "alice/kva-private", token=server.bob, endpoint=server.url)
    with pytest.raises(errors.HubRepoNotFoundError, match="no local file 'alice/no-selection' either"):
        pull_selection(server, "alice/no-selection")


def test_local_sources_stay_local(tmp_path, attributions):
    assert torch.equal(loki.load_attributions(attributions.path).values, attributions.values)
    assert loki.load_attributions(attributions.path).origin is None
    with pytest.raises(errors.AttributionError, match="No such folder"):
        loki.load_attributions(tmp_path / "missing")
    with pytest.raises(errors.AttributionError, match="not an attribution folder"):
        loki.load_attributions(tmp_path)
    selection = loki.Selection.random(2, 32, q=10).save(tmp_path / "q10.json")
    with pytest.raises(errors.AttributionError, match="is a file.*load_selection"):  # not NotADirectoryError
        loki.load_attributions(selection)
    with pytest.raises(errors.SelectionError, match="Cannot read"):
        loki.load_selection("sels/missing.json")  # shaped like a repo id, but a .json path: never a Hub request
    saved = attributions.save(tmp_path / "copy")
    assert attributions.saved_at() == attributions.path and attributions.saved_at(saved) == saved
    assert torch.equal(loki.Attributions.load(saved).values, attributions.values)
    assert attributions.save(attributions.path) == attributions.path  # its own folder: nothing to write


# -- command line -----------------------------------------------------------------------------------
def test_cli_push_and_select_from_a_hub_id(server, attributions, tmp_path, capsys, monkeypatch):
    from loki.cli import main

    args = ["--endpoint", server.url, "--token", server.alice]
    assert main(["push", str(attributions.path), "alice/cli-kva", *args]) == 0
    assert "alice/cli-kva @ " in capsys.readouterr().out
    out = tmp_path / "q10.json"
    assert main(["select", "alice/cli-kva", "-q", "10", "--out", str(out), *args]) == 0
    assert "layer_balanced, q=10.0: 6 rows in 2 layers" in capsys.readouterr().out
    sel = loki.Selection.load(out)
    assert same_selection(sel, loki.select(attributions, q=10.0)) and sel.source.startswith("alice/cli-kva@")

    assert main(["push", str(out), "alice/cli-q10", *args]) == 0
    assert same_selection(pull_selection(server, "alice/cli-q10"), sel)
    assert main(["select", "alice/cli-q10", "-q", "10", "--out", str(tmp_path / "x.json"), *args]) == 2
    assert "holds a loki selection, not loki attributions" in capsys.readouterr().err

    server.clear()  # offline: the cache alone answers, with neither endpoint nor token
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["select", "alice/cli-kva", "-q", "25", "--strategy", "global_lowest", "--out", str(out)]) == 0
    assert same_selection(loki.Selection.load(out), loki.select(attributions, q=25.0, strategy="global_lowest"))
    assert server.count() == 0


def test_cli_select_from_a_local_folder_joins_shards(tmp_path, capsys):
    from loki.cli import main

    model = tiny_model("llama")
    for rank in (0, 1):
        loki.attribute(model, None, PROMPTS, steps=3, path=tmp_path / "run", shard=(rank, 2), progress=False)
    out = tmp_path / "q10.json"
    assert main(["select", str(tmp_path / "run"), "-q", "10", "--out", str(out)]) == 0  # no request: a local folder
    joined = loki.Attributions.load(tmp_path / "run")
    assert joined.meta["merged_shards"] == 2
    sel = loki.Selection.load(out)
    assert same_selection(sel, loki.select(joined, q=10.0)) and sel.source == str(tmp_path / "run")
    assert main(["select", str(tmp_path / "nowhere"), "-q", "10", "--out", str(out)]) == 2
    assert "AttributionError: No such folder" in capsys.readouterr().err
