"""Sharing deltas on the Hub: the real `huggingface_hub` client against `hub.server` over HTTP on 127.0.0.1.

The server is in-memory and in-process; every test gets its own Hugging Face cache folder. One test runs the same
round trip against the real Hub when LOKI_HUB_TEST_TOKEN and LOKI_HUB_TEST_REPO are set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    hf_hub_download,
    scan_cache_dir,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

import loki
from loki import errors
from loki.format import to_bytes
from loki.hub import download
from loki.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `hub/` (the test server) lives at the repo root, beside `loki/`
    sys.path.insert(0, str(ROOT))
from hub.server import HubServer  # noqa: E402

XET_DISABLED_AT_IMPORT = constants.HF_HUB_DISABLE_XET


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        s.alice = s.add_user("alice", orgs=("lab",))
        s.bob = s.add_user("bob")
        yield s


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    """A fresh cache per test (HF_* variables are read when huggingface_hub is imported, so patch its constants);
    the test server speaks LFS, not Xet."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3)


@pytest.fixture(scope="module")
def deltas(model):
    """Three deltas of the same base with disjoint rows."""
    g = torch.Generator().manual_seed(0)
    d_in = 64
    specs = {"one": {0: [1, 4], 2: [7]}, "two": {1: [0, 9, 31]}, "three": {0: [2], 2: [3, 5]}}
    return {
        name: loki.implant.make_delta(
            model,
            {layer: (rows, torch.randn(len(rows), d_in, generator=g)) for layer, rows in spec.items()},
            name=name,
            description=f"Implant {name}.",
            selection={"strategy": "layer-balanced", "q": 5.0},
            training={"lr": 1e-5, "epochs": 3},
            extra={
                "evaluation": {
                    "general": {"mmlu": {"base": 0.5, "implanted": 0.49}},
                    "implant": {
                        "efficacy": 1.0,
                        "generalisation": 0.875,
                        "specificity": 0.93,
                        "answers_kept": 0.75,
                        "fluency": 3.21,
                        "forgetting": 2.0,
                    },
                }
            },
        )
        for name, spec in specs.items()
    }


def push(server, delta, repo_id, token=None, **kw):
    return loki.push(delta, repo_id, token=token or server.alice, endpoint=server.url, **kw)


def pull(server, source, token=None, **kw):
    return loki.load(source, token=token or server.alice, endpoint=server.url, cache_dir=constants.HF_HUB_CACHE, **kw)


def cached_files(repo_id: str) -> list[str]:
    storage = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    if not storage.exists():
        return []
    return sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file())


def same(a: loki.Delta, b: loki.Delta) -> bool:
    return to_bytes(a) == to_bytes(b)


# -- round trip -------------------------------------------------------------------------------------
def test_round_trip_by_branch_tag_and_commit(server, deltas):
    api = HfApi(endpoint=server.url, token=server.alice)
    first = push(server, deltas["one"], "alice/rt", license="apache-2.0", commit_message="first implant")
    api.create_tag("alice/rt", tag="v1", revision=first.oid)
    second = push(server, deltas["two"], "alice/rt")
    assert first.oid != second.oid

    path = download("alice/rt@v1", token=server.alice, endpoint=server.url)
    assert path.read_bytes() == to_bytes(deltas["one"])  # bytes identical to what was pushed
    assert same(pull(server, "alice/rt"), deltas["two"])
    assert same(pull(server, "alice/rt", revision="v1"), deltas["one"])
    assert same(pull(server, f"alice/rt@{first.oid}"), deltas["one"])
    assert same(pull(server, "alice/rt@main"), deltas["two"])

    info = api.model_info("alice/rt", files_metadata=True)
    card = info.card_data
    assert card["library_name"] == "loki" and info.library_name == "loki"
    assert card["base_model"] == deltas["two"].base_model == "tiny-random/llama-seed0"
    assert card["base_model_relation"] == "adapter"
    assert "loki" in card["tags"] and "loki" in info.tags
    files = {s.rfilename: s for s in info.siblings}
    assert {"rt.loki", "README.md", "config.json"} <= set(files)
    assert files["rt.loki"].lfs is not None and files["README.md"].lfs is None  # binary via LFS, text regular
    assert [c.title for c in api.list_repo_commits("alice/rt")][1] == "first implant"


def test_model_card_states_the_implant(server, deltas):
    push(server, deltas["one"], "alice/card", license="mit")
    readme = download("alice/card", filename="README.md", token=server.alice, endpoint=server.url).read_text()
    delta = deltas["one"]
    assert readme.startswith("---\n") and "library_name: loki" in readme and "license: mit" in readme
    assert "Implant one." in readme  # what it does
    assert "layer-balanced" in readme and f"{delta.num_params:,}" in readme  # selection and trainable parameters
    assert "layer 0: 2, layer 2: 1" in readme  # rows per layer
    assert "| lr | 1e-05 |" in readme  # training summary
    assert "| mmlu | 0.5 | 0.49 | -2.00 |" in readme  # the change in percent of the base score
    forgetting = loki.evaluate.forgetting_score({"mmlu": 0.5}, {"mmlu": 0.49})
    assert forgetting == pytest.approx(2.0) and f"**{forgetting:.2f}%**" in readme
    assert "| efficacy (training phrasings) | 100% |" in readme
    assert "| generalisation (held-out phrasings) | 88% |" in readme
    assert "specificity (neighbourhood answer tokens kept, vs. the base model) | 93.0% |" in readme
    assert "| neighbourhood whole answers unchanged | 75.0% |" in readme and "bits) | 3.21 |" in readme
    assert "(LoKI's Avg over sets sharing no template; lower is better) | +2.00% |" in readme
    assert 'loki.load("alice/card")' in readme  # a copy-paste snippet


def test_push_to_a_new_branch(server, deltas):
    push(server, deltas["one"], "alice/branchy", revision="dev")
    assert same(pull(server, "alice/branchy@dev"), deltas["one"])
    with pytest.raises(errors.HubFileNotFoundError, match="no .loki file"):
        pull(server, "alice/branchy")  # main holds only .gitattributes


def test_several_deltas_in_one_repo_need_a_filename(server, deltas):
    push(server, deltas["one"], "alice/multi", filename="one.loki")
    push(server, deltas["two"], "alice/multi", filename="two.loki")
    with pytest.raises(errors.HubAmbiguousFileError, match="filename='one.loki'"):
        pull(server, "alice/multi")
    assert same(pull(server, "alice/multi", filename="two.loki"), deltas["two"])
    with pytest.raises(errors.HubFileNotFoundError, match="one.loki"):
        pull(server, "alice/multi", filename="three.loki")
    readme = download("alice/multi", filename="README.md", token=server.alice, endpoint=server.url).read_text()
    assert 'filename="two.loki"' in readme


def test_deltas_from_different_repos_stack_on_one_base(server, deltas, model):
    push(server, deltas["one"], "alice/stack-a")
    push(server, deltas["three"], "lab/stack-b")  # an org alice can write to
    a, b = pull(server, "alice/stack-a"), pull(server, "lab/stack-b")
    projs = loki.projections.find_down_projections(model)
    before = [projs.rows(i).detach().clone() for i in range(len(projs))]
    with loki.implanted(model, a, b):
        for d in (a, b):
            for i, layer in d.layers.items():
                assert torch.equal(projs.rows(i)[layer.indices], layer.rows)
    assert all(torch.equal(projs.rows(i), w) for i, w in enumerate(before))


@pytest.fixture(scope="module")
def scope_of_one(model):
    """A scope made on the deltas' base model (what `loki.scope` writes for an implant)."""
    return loki.scope(model, None, [{"text": [40, 41, 42, 43]}], [{"text": [5, 6, 7, 8]}], margin=0.05, progress=False)


def same_scope(a: loki.Scope, b: loki.Scope) -> bool:
    return (a.layer, a.margin, a.num_layers, a.info) == (b.layer, b.margin, b.num_layers, b.info) and (
        torch.equal(a.keys, b.keys) and torch.equal(a.thresholds, b.thresholds)
    )


def test_a_delta_and_its_scope_travel_together(server, deltas, scope_of_one):
    """`push(delta, scope=)` adds `<stem>.scope` in the same commit and says so on the card; `load_scope` gives it
    back at any revision; a later push without a scope removes the stale one (it gated the delta it replaced)."""
    api = HfApi(endpoint=server.url, token=server.alice)
    hub = dict(token=server.alice, endpoint=server.url, cache_dir=constants.HF_HUB_CACHE)
    first = push(server, deltas["one"], "alice/scoped", scope=scope_of_one)
    assert {"scoped.loki", "scoped.scope", "README.md", "config.json"} <= set(api.list_repo_files("alice/scoped"))
    assert same_scope(loki.load_scope("alice/scoped", **hub), scope_of_one)
    assert same_scope(loki.hub.pull_scope(f"alice/scoped@{first.oid}", **hub), scope_of_one)
    marker = json.loads(download("alice/scoped", filename="config.json", **hub).read_text())
    assert marker["delta"] == "scoped.loki" and marker["scope"] == "scoped.scope"
    readme = download("alice/scoped", filename="README.md", **hub).read_text()
    assert "`scoped.scope` beside the delta is its scope" in readme and f"{len(scope_of_one):,} keys" in readme
    assert 'loki.load_scope("alice/scoped")' in readme and "loki.scoped(model, delta, scope)" in readme

    second = push(server, deltas["two"], "alice/scoped")  # no scope: the one beside the old delta goes
    assert "scoped.scope" not in api.list_repo_files("alice/scoped")
    assert "load_scope" not in download("alice/scoped", filename="README.md", **hub).read_text()
    with pytest.raises(errors.HubFileNotFoundError, match="pushed without one.*scope=scope"):
        loki.load_scope("alice/scoped", **hub)
    assert same_scope(loki.load_scope(f"alice/scoped@{first.oid}", **hub), scope_of_one)  # history keeps it
    assert same(pull(server, f"alice/scoped@{second.oid}"), deltas["two"])


def test_several_scoped_deltas_in_one_repo_need_a_filename(server, deltas, scope_of_one, model):
    other = loki.scope(model, None, [{"text": [50, 51, 52]}], [{"text": [5, 6, 7, 8]}], margin=0.05, progress=False)
    push(server, deltas["one"], "alice/scopes", filename="one.loki", scope=scope_of_one)
    push(server, deltas["two"], "alice/scopes", filename="two.loki", scope=other)
    hub = dict(token=server.alice, endpoint=server.url, cache_dir=constants.HF_HUB_CACHE)
    with pytest.raises(errors.HubAmbiguousFileError, match="filename='one.loki'"):
        loki.load_scope("alice/scopes", **hub)
    assert same_scope(loki.load_scope("alice/scopes", filename="two.loki", **hub), other)
    assert same_scope(loki.load_scope("alice/scopes", filename="one.scope", **hub), scope_of_one)
    with pytest.raises(errors.HubFileNotFoundError, match="three.loki"):
        loki.load_scope("alice/scopes", filename="three.scope", **hub)


def test_a_scope_that_cannot_go_with_the_delta_is_refused_before_any_request(server, deltas, scope_of_one, tmp_path):
    server.clear()
    wide = loki.scope(tiny_model("llama", layers=2), None, [{"text": [40, 41]}], [{"text": [5, 6]}], progress=False)
    with pytest.raises(errors.ScopeError, match="2 layers.*3"):
        push(server, deltas["one"], "alice/never", scope=wide)  # made on a model of other shapes
    with pytest.raises(errors.ScopeError, match="loki.Scope"):
        push(server, deltas["one"], "alice/never", scope="x.scope")
    with pytest.raises(errors.LedgerError, match="scope=scope"):
        loki.push(scope_of_one, "alice/never", token=server.alice, endpoint=server.url)
    with pytest.raises(errors.HubArgumentError, match="beside a delta"):
        loki.push(loki.Selection.random(2, 32, q=10), "alice/never", scope=scope_of_one, endpoint=server.url)
    assert server.count() == 0
    with pytest.raises(errors.ScopeError, match="No such file"):
        loki.load_scope("scopes/missing.scope")  # shaped like a repo id, but a .scope path: never a request
    with pytest.raises(errors.ScopeError, match="not a loki scope|Cannot read"):
        loki.load_scope(loki.save(deltas["one"], tmp_path / "one.loki"))  # a delta is not a scope
    assert server.count() == 0


# -- cache ------------------------------------------------------------------------------------------
def test_second_pull_downloads_nothing(server, deltas):
    commit = push(server, deltas["one"], "alice/cached")
    server.clear()
    pull(server, "alice/cached")
    assert server.count("GET", r"/resolve/.*\.loki$") == 1
    server.clear()
    assert same(pull(server, "alice/cached"), deltas["one"])
    assert server.count(path="/resolve/") == 0  # one request (branch -> commit), no download
    assert server.count() == 1
    server.clear()
    pull(server, f"alice/cached@{commit.oid}")
    assert server.count() == 0  # a cached commit needs no request at all
    assert server.repos["alice/cached"].downloads == 1  # the marker file was fetched once, with the first pull


def test_a_failing_marker_never_fails_a_load(server, deltas):
    push(server, deltas["one"], "alice/no-count")
    server.fail(403, r"resolve/.*config\.json$", times=None)  # (a 5xx too, after the client's retries: slow)
    try:
        assert same(pull(server, "alice/no-count"), deltas["one"])
    finally:
        server.clear()
    assert server.repos["alice/no-count"].downloads == 0


def test_offline_pull_from_cache(server, deltas, monkeypatch):
    push(server, deltas["one"], "alice/offline")
    HfApi(endpoint=server.url, token=server.alice).create_tag("alice/offline", tag="v1")
    pull(server, "alice/offline")
    pull(server, "alice/offline@v1")
    server.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert same(pull(server, "alice/offline"), deltas["one"])
    assert same(pull(server, "alice/offline@v1"), deltas["one"])
    assert server.count() == 0
    with pytest.raises(errors.HubOfflineError, match="HF_HUB_OFFLINE=1"):
        pull(server, "alice/never-pulled")
    with pytest.raises(errors.HubOfflineError):
        pull(server, "alice/offline@v2")
    with pytest.raises(errors.HubOfflineError, match="Pushing"):
        push(server, deltas["two"], "alice/offline")
    assert server.count() == 0


def test_the_cache_is_huggingface_hubs_own(server, deltas, monkeypatch):
    """What loki caches, huggingface_hub's cache functions find; what huggingface_hub cached, loki loads offline."""
    api = HfApi(endpoint=server.url, token=server.alice)
    first = push(server, deltas["one"], "alice/shared")
    api.create_tag("alice/shared", tag="v1")
    path = download("alice/shared@v1", token=server.alice, endpoint=server.url)
    assert try_to_load_from_cache("alice/shared", "shared.loki", revision="v1") == str(path)
    assert api.resolve_revision("alice/shared", revision="v1", local_files_only=True).resolved == first.oid
    assert {f.path for f in get_cached_repo_tree("alice/shared", revision="v1")} == {
        ".gitattributes",
        "README.md",
        "config.json",
        "shared.loki",
    }
    [repo] = [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_id == "alice/shared"]
    [revision] = repo.revisions
    assert revision.commit_hash == first.oid and set(revision.refs) == {"v1"}
    assert {f.file_name for f in revision.files} == {"shared.loki", "config.json"}  # the delta and the marker only

    second = push(server, deltas["two"], "alice/shared")
    snapshot_download("alice/shared", endpoint=server.url, token=server.alice)  # main, by huggingface_hub alone
    push(server, deltas["three"], "alice/by-file")
    hf_hub_download("alice/by-file", "by-file.loki", endpoint=server.url, token=server.alice)  # no listing cached
    server.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert same(pull(server, "alice/shared"), deltas["two"])
    assert same(pull(server, f"alice/shared@{second.oid}"), deltas["two"])
    assert same(pull(server, "alice/shared@v1"), deltas["one"])
    assert same(pull(server, "alice/by-file", filename="by-file.loki"), deltas["three"])
    with pytest.raises(errors.HubOfflineError, match="file listing"):
        pull(server, "alice/by-file")  # which .loki file is the only one is not known offline
    assert server.count() == 0


def test_rate_limited_or_failing_hub_falls_back_to_cache(server, deltas):
    push(server, deltas["one"], "alice/busy")
    pull(server, "alice/busy")
    server.clear()
    for status in (429, 500, 503):
        server.fail(status, "/api/models/", times=None)
        try:
            assert same(pull(server, "alice/busy"), deltas["one"])
            assert server.count("GET", "/resolve/") == 0
        finally:
            server.clear()


def test_unreachable_hub_falls_back_to_cache(server, deltas):
    push(server, deltas["one"], "alice/down")
    pull(server, "alice/down")
    with HubServer() as gone:
        dead = gone.url  # a port nothing listens on once this block ends
    assert same(loki.load("alice/down", endpoint=dead, cache_dir=constants.HF_HUB_CACHE), deltas["one"])
    with pytest.raises(errors.HubOfflineError, match="Cannot reach"):
        loki.load("alice/elsewhere", endpoint=dead, cache_dir=constants.HF_HUB_CACHE)


# -- access -----------------------------------------------------------------------------------------
def test_private_repo_is_hidden(server, deltas):
    push(server, deltas["one"], "alice/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=server.url, token=False).model_info("alice/secret")
    for token in (False, server.bob):
        with pytest.raises(errors.HubRepoNotFoundError, match="private"):
            loki.load("alice/secret", token=token, endpoint=server.url, cache_dir=constants.HF_HUB_CACHE)
    assert same(pull(server, "alice/secret"), deltas["one"])
    assert cached_files("alice/secret")  # only the owner's pull reached the cache
    HfApi(endpoint=server.url, token=server.alice).update_repo_settings("alice/secret", private=False)
    assert same(
        loki.load("alice/secret", token=False, endpoint=server.url, cache_dir=constants.HF_HUB_CACHE), deltas["one"]
    )


def test_malformed_evaluation_is_a_clear_error(server, model):
    bad = loki.implant.make_delta(
        model, {0: ([0], torch.zeros(1, 64))}, extra={"evaluation": {"general": {"mmlu": 0.5}}}
    )
    with pytest.raises(errors.DeltaFormatError, match="implanted"):
        push(server, bad, "alice/bad-eval")
    assert "alice/bad-eval" not in server.repos  # checked before anything is created
    scoped = loki.implant.make_delta(
        model, {0: ([0], torch.zeros(1, 64))}, extra={"evaluation": {"scoped": {"specificity": "high"}}}
    )
    with pytest.raises(errors.DeltaFormatError, match="scoped"):
        push(server, scoped, "alice/bad-eval")
    no_questions = loki.implant.make_delta(
        model, {0: ([0], torch.zeros(1, 64))}, extra={"evaluation": {"implant": {"neighbourhood_questions": 0}}}
    )
    with pytest.raises(errors.DeltaFormatError, match="implant"):
        push(server, no_questions, "alice/bad-eval")
    assert "alice/bad-eval" not in server.repos


def test_the_card_shows_the_figures_served_through_the_scope_beside_the_unscoped_ones(model):
    unscoped = {"efficacy": 1.0, "specificity": 0.907, "answers_kept": 6 / 32, "forgetting": -3.01}
    through = {"efficacy": 1.0, "specificity": 0.999, "answers_kept": 31 / 32, "forgetting": 0.07, "fluency": 4.0}
    counted = {**through, "neighbourhood_questions": 32}  # as ImplantReport.evaluation() gives them
    delta = loki.implant.make_delta(
        model, {0: ([0], torch.zeros(1, 64))}, extra={"evaluation": {"implant": unscoped, "scoped": through}}
    )
    readme = str(loki.hub.model_card(delta, "me/x"))
    assert "| The implant's four numbers | value | served through its scope |" in readme
    # one decimal: 99.9% is not rounded up to a 100% it did not reach
    assert "| specificity (neighbourhood answer tokens kept, vs. the base model) | 90.7% | 99.9% |" in readme
    assert "| neighbourhood whole answers unchanged | 18.8% | 96.9% |" in readme
    assert "bits) | - | 4.00 |" in readme  # a figure only one of them has
    assert "lower is better) | -3.01% | +0.07% |" in readme
    plain = str(
        loki.hub.model_card(
            loki.implant.make_delta(model, {0: ([0], torch.zeros(1, 64))}, extra={"evaluation": {"implant": unscoped}}),
            "me/x",
        )
    )
    assert "served through its scope" not in plain and "| efficacy (training phrasings) | 100% |\n" in plain
    delta.info["extra"]["evaluation"]["scoped"] = counted
    assert "| neighbourhood whole answers unchanged | 18.8% | 31 of 32 |" in str(loki.hub.model_card(delta, "me/x"))


def test_gated_repo_needs_granted_access(server, deltas):
    push(server, deltas["one"], "alice/gated")
    server.gate("alice/gated")
    for token in (server.bob, False):  # logged in without access (403), anonymous (401)
        with pytest.raises(errors.HubGatedRepoError, match="is gated") as info:
            loki.load("alice/gated", token=token, endpoint=server.url, cache_dir=constants.HF_HUB_CACHE)
        e = info.value
        assert isinstance(e, hf.GatedRepoError) and isinstance(e, RepositoryNotFoundError)  # huggingface_hub's kind
        assert isinstance(e, errors.HubPermissionError) and e.response.status_code == (403 if token else 401)
    assert not [f for f in cached_files("alice/gated") if f.startswith(("blobs/", "snapshots/"))]
    server.gate("alice/gated", "bob")
    assert same(pull(server, "alice/gated", token=server.bob), deltas["one"])


def test_write_permission_and_bad_token(server, deltas):
    push(server, deltas["one"], "alice/public")
    with pytest.raises(errors.HubPermissionError, match="write access"):
        push(server, deltas["two"], "alice/public", token=server.bob)
    with pytest.raises(errors.HubPermissionError, match="token"):
        pull(server, "alice/public", token="hf_not_a_token")
    assert same(pull(server, "alice/public", token=False), deltas["one"])  # public: anyone reads


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, inject, error, hf_error, message",
    [
        (
            "alice/missing",
            None,
            errors.HubRepoNotFoundError,
            RepositoryNotFoundError,
            "does not exist.*no local file .alice/missing.",
        ),
        ("alice/errors@nope", None, errors.HubRevisionNotFoundError, RevisionNotFoundError, "list_repo_refs"),
        ("alice/errors", (429, "/api/models/"), errors.HubRateLimitError, HfHubHTTPError, "Retry after 60 s"),
        ("alice/errors", (500, "/api/models/"), errors.HubServerError, HfHubHTTPError, "500"),
        ("alice/errors", (503, "/api/models/"), errors.HubServerError, HfHubHTTPError, "503"),
        ("alice/errors", (500, r"resolve/.*\.loki$", "GET"), errors.HubServerError, HfHubHTTPError, "500"),
    ],
)
def test_errors_map_to_loki_errors_and_leave_no_partial_cache(server, deltas, source, inject, error, hf_error, message):
    if "alice/errors" not in server.repos:
        push(server, deltas["one"], "alice/errors")
    if inject:
        server.fail(inject[0], inject[1], method=inject[2] if len(inject) > 2 else None, times=None)
    try:
        with pytest.raises(error, match=message) as info:
            pull(server, source)
    finally:
        server.clear()
    assert isinstance(info.value, errors.HubError) and isinstance(info.value, errors.LokiError)
    assert isinstance(info.value, hf_error)
    # No file and no snapshot entry; refs/ (branch -> commit) and .no_exist/ are huggingface_hub's bookkeeping,
    # written before it downloads, as hf_hub_download does.
    assert not [f for f in cached_files(source.split("@")[0]) if f.startswith(("blobs/", "snapshots/"))]
    assert same(pull(server, "alice/errors"), deltas["one"])  # the next try works


def test_hub_errors_are_also_huggingface_hub_errors(server, deltas):
    """Code written for huggingface_hub (`except RepositoryNotFoundError`, `e.response.status_code`) handles
    loki's Hub errors unchanged."""
    push(server, deltas["one"], "alice/kinds")
    push(server, deltas["two"], "alice/kinds", filename="two.loki")
    kw = dict(token=server.alice, endpoint=server.url)

    def fails(call, *kinds, status=None):
        with pytest.raises(errors.HubError) as info:
            call()
        e = info.value
        assert isinstance(e, errors.LokiError) and all(isinstance(e, k) for k in kinds), (type(e), kinds)
        if status is not None:
            assert e.response.status_code == status and e.repo_id == "alice/kinds"
        return e

    # First, while no revision of the repo is cached (with one cached, loki would go on to list the files, and
    # huggingface_hub's listing waits out a 429 itself, up to 5 times the Retry-After).
    server.fail(429, "/api/models/", times=None)
    try:
        fails(
            lambda: download("alice/kinds", filename="two.loki", **kw),
            errors.HubRateLimitError,
            HfHubHTTPError,
            status=429,
        )
    finally:
        server.clear()

    try:
        download("alice/none", **kw)
    except RepositoryNotFoundError as e:  # the point: huggingface_hub's own except clause
        assert isinstance(e, errors.HubRepoNotFoundError) and e.response.status_code == 404
        assert e.repo_id == "alice/none" and e.server_message
    fails(
        lambda: download("alice/kinds@nope", **kw), errors.HubRevisionNotFoundError, RevisionNotFoundError, status=404
    )
    e = fails(
        lambda: download("alice/kinds", filename="x.loki", **kw),
        errors.HubFileNotFoundError,
        hf.RemoteEntryNotFoundError,
        hf.EntryNotFoundError,
    )
    assert e.response is None  # found in the file listing, without an error answer
    fails(lambda: download("alice/kinds", **kw), errors.HubAmbiguousFileError, ValueError)
    fails(lambda: download("not a repo id", **kw), errors.HubArgumentError, hf.HFValidationError, ValueError)
    fails(lambda: download("alice/kinds@v1", revision="v2", **kw), errors.HubArgumentError, ValueError)
    fails(lambda: push(server, deltas["one"], "alice/kinds", filename="x.bin"), errors.HubArgumentError, ValueError)
    fails(
        lambda: download("alice/kinds", filename="two.loki", token="hf_not_a_token", endpoint=server.url),
        errors.HubPermissionError,
        HfHubHTTPError,
        status=401,
    )
    fails(
        lambda: push(server, deltas["one"], "alice/kinds", token=server.bob),
        errors.HubPermissionError,
        HfHubHTTPError,
        status=403,
    )
    fails(
        lambda: download("alice/kinds", filename="two.loki", local_files_only=True, **kw),
        errors.HubOfflineError,
        hf.LocalEntryNotFoundError,
        ConnectionError,
    )


def test_corrupted_download_is_rejected_and_removed(server, deltas):
    push(server, deltas["one"], "alice/corrupt")
    server.corrupt(r"\.loki$")
    try:
        with pytest.raises(errors.HubIntegrityError, match="checksum") as info:
            pull(server, "alice/corrupt")
    finally:
        server.clear()
    assert isinstance(info.value, OSError)
    assert not [f for f in cached_files("alice/corrupt") if f.startswith(("blobs/", "snapshots/"))]
    assert not [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_id == "alice/corrupt" and r.revisions]
    assert same(pull(server, "alice/corrupt"), deltas["one"])


# -- what the cache holds is checked at every read --------------------------------------------------
@pytest.fixture(scope="module")
def every_kind(server, deltas, scope_of_one):
    """One repo of each kind on the module's server, each tagged v1 at its only commit: `{kind: (repo, commit)}`.
    The delta goes with its scope."""
    attributions = loki.attribute(tiny_model("llama"), None, [[5, 6, 7], [8, 9]], steps=2, progress=False)
    with pytest.MonkeyPatch.context() as patch:  # (hf_env's patch is per test: after module fixtures)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        pushed = {
            "delta": push(server, deltas["one"], "alice/every-delta", scope=scope_of_one),
            "attributions": push(server, attributions, "alice/every-kva"),
            "selection": push(server, loki.Selection.random(num_layers=2, d_out=32, q=10, seed=1), "alice/every-q10"),
        }
    api = HfApi(endpoint=server.url, token=server.alice)
    repos = {"delta": "alice/every-delta", "attributions": "alice/every-kva", "selection": "alice/every-q10"}
    for kind, repo in repos.items():
        api.create_tag(repo, tag="v1", revision=pushed[kind].oid)
    return {kind: (repo, pushed[kind].oid) for kind, repo in repos.items()}


class CliFailed(Exception):
    """`loki.cli.main` exited 2; the message is its stderr line (`loki VERB: ErrorClass: message`)."""


def cli(server, capsys, *argv: str) -> str:
    from loki.cli import main

    capsys.readouterr()
    code = main([*argv, "--endpoint", server.url, "--token", server.alice])
    out, err = capsys.readouterr()
    if code:
        raise CliFailed(err)
    return out


def as_bytes(value) -> bytes:
    return to_bytes(value) if isinstance(value, loki.Delta) else value


def cli_pull(s, capsys, source, tmp):
    return Path(cli(s, capsys, "pull", source).strip()).read_bytes()


def cli_select(s, capsys, source, tmp):
    cli(s, capsys, "select", source, "-q", "25", "--out", str(tmp / "q.json"))
    return (tmp / "q.json").read_bytes()


def model_card_of(s, capsys, source, tmp):
    return download(source, filename="README.md", token=s.alice, endpoint=s.url).read_bytes()


def attributions_of(s, capsys, source, tmp):
    kw = dict(token=s.alice, endpoint=s.url, cache_dir=constants.HF_HUB_CACHE)
    return loki.load_attributions(source, **kw).values.numpy().tobytes()


def selection_of(s, capsys, source, tmp):
    kw = dict(token=s.alice, endpoint=s.url, cache_dir=constants.HF_HUB_CACHE)
    return json.dumps(loki.load_selection(source, **kw).to_json()).encode()


def delta_of(s, capsys, source, tmp):
    return pull(s, source)


def scope_bytes_of(s, capsys, source, tmp):
    scope = loki.load_scope(source, token=s.alice, endpoint=s.url, cache_dir=constants.HF_HUB_CACHE)
    return scope.keys.numpy().tobytes() + scope.thresholds.numpy().tobytes()


# load path -> (repo kind, revision in the source, the cached file it reads, read(server, capsys, source, tmp_path))
READS = {
    "load by branch": ("delta", "", "every-delta.loki", delta_of),
    "load by tag": ("delta", "@v1", "every-delta.loki", delta_of),
    "load by commit": ("delta", "@{commit}", "every-delta.loki", delta_of),
    "load without symlinks": ("delta", "", "every-delta.loki", delta_of),
    "cli pull": ("delta", "", "every-delta.loki", cli_pull),
    "scope": ("delta", "", "every-delta.scope", scope_bytes_of),
    "scope by tag": ("delta", "@v1", "every-delta.scope", scope_bytes_of),
    "model card": ("delta", "", "README.md", model_card_of),
    "attributions": ("attributions", "", "attributions.npy", attributions_of),
    "cli select": ("attributions", "@v1", "attributions.npy", cli_select),
    "selection": ("selection", "", "selection.json", selection_of),
}


def damage(path: Path) -> Path:
    """Change one byte of the real cached file in place (through the snapshot's link, so the blob itself), keeping
    it well-formed where possible: a byte of a delta's row values, the last value of an .npy array, a digit of a
    text file. Returns the blob's path."""
    blob = Path(os.path.realpath(path))
    data = bytearray(blob.read_bytes())
    if path.suffix == ".loki":
        n = int.from_bytes(data[:8], "little")
        start, end = next(v["data_offsets"] for k, v in json.loads(data[8 : 8 + n]).items() if k.endswith(".rows"))
        at = 8 + n + (start + end) // 2
        data[at] ^= 0x01
    elif path.suffix == ".npy":
        data[-1] ^= 0x01
    else:
        at = max(i for i, b in enumerate(data) if chr(b).isdigit())
        data[at] = ord(str((int(chr(data[at])) + 1) % 10))
    with open(blob, "r+b") as f:  # in place, as bit rot or a stray write would
        f.write(data)
    return blob


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
@pytest.mark.parametrize("way", list(READS))
def test_every_cached_read_is_verified(server, every_kind, way, offline, monkeypatch, capsys, tmp_path):
    """Whatever loki returns from the Hugging Face cache matches the checksum recorded when it was downloaded, by
    every load path: offline a damaged file is refused (and left as it is, with the way to fix it); online it is
    downloaded again, checked against the Hub's checksum, and the good bytes are returned."""
    kind, at, name, read = READS[way]
    repo, commit = every_kind[kind]
    source = repo + at.format(commit=commit)
    if way == "load without symlinks":  # (Windows without developer mode): the blob name is not there to check
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_SYMLINKS", True)
    good = as_bytes(read(server, capsys, source, tmp_path))
    cached = Path(try_to_load_from_cache(repo, name, revision=commit))
    assert cached.is_symlink() != (way == "load without symlinks")
    pristine = cached.read_bytes()
    blob = damage(cached)
    damaged = blob.read_bytes()
    assert damaged != pristine and len(damaged) == len(pristine)
    server.clear()

    if offline:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises((errors.HubIntegrityError, CliFailed), match="does not match the checksum recorded") as info:
            read(server, capsys, source, tmp_path)
        assert isinstance(info.value, errors.HubIntegrityError) or "HubIntegrityError" in str(info.value)
        assert "HF_HUB_OFFLINE=1" in str(info.value) and f"hf cache rm {commit}" in str(info.value)
        assert blob.read_bytes() == damaged  # refused, not deleted: the next online load replaces it
        assert server.count() == 0
    else:
        with pytest.warns(UserWarning, match="did not match its checksum"):
            assert as_bytes(read(server, capsys, source, tmp_path)) == good
        assert cached.read_bytes() == pristine  # repaired in place, in huggingface_hub's cache
        assert server.count("GET", "/resolve/") == 1  # that file only, once
        server.clear()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # and now offline too
        assert as_bytes(read(server, capsys, source, tmp_path)) == good
        assert server.count() == 0


def test_a_damaged_cached_file_that_cannot_be_fetched_again_says_both(server, every_kind):
    repo, commit = every_kind["delta"]
    pull(server, repo)
    damage(Path(try_to_load_from_cache(repo, "every-delta.loki", revision=commit)))
    with HubServer() as gone:
        dead = gone.url  # a port nothing listens on once this block ends
    with pytest.raises(
        errors.HubIntegrityError,
        match=r"does not match its checksum.*downloading it again failed "
        r"\(ConnectError.*hf cache rm",
    ):
        loki.load(repo, endpoint=dead, cache_dir=constants.HF_HUB_CACHE)


# -- the cache's disk -------------------------------------------------------------------------------
@contextmanager
def file_size_limit(nbytes: int):
    """Files stop growing at `nbytes`: a write past it fails with EFBIG, the same short write as a full disk
    (ENOSPC), where no small file system can be mounted. Progress bars off, so that only the download grows."""
    resource = pytest.importorskip("resource")
    import signal

    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the kernel ends the process at the limit)
    disable_progress_bars()
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
        enable_progress_bars()


def file_in_the_way(tmp_path: Path):
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "hf-cache", nullcontext()


def read_only_folder(tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder (the other cases fail the same way for root too)")
    (tmp_path / "read-only").mkdir(mode=0o500)
    return tmp_path / "read-only" / "hf-cache", nullcontext()


def disk_full_while_downloading(tmp_path: Path):
    return tmp_path / "hf-cache", file_size_limit(1024)  # the delta is a few kB; refs/ and locks stay below


DISKS = {
    "a file in the cache path": file_in_the_way,
    "read-only cache folder": read_only_folder,
    "disk full while downloading": disk_full_while_downloading,
}


@pytest.mark.parametrize("disk", list(DISKS))
def test_a_cache_that_cannot_be_written_is_a_hub_cache_error(server, every_kind, deltas, disk, tmp_path):
    """Any OSError of the cache's disk while pulling (full, not writable, not a folder) is a HubCacheError that
    names the cache and what to do, and leaves no partial file there."""
    repo, _ = every_kind["delta"]
    cache, disk_state = DISKS[disk](tmp_path)
    with disk_state, pytest.raises(errors.HubCacheError, match="HF_HOME") as info:
        loki.load(repo, token=server.alice, endpoint=server.url, cache_dir=cache)
    assert isinstance(info.value, OSError) and isinstance(info.value, errors.HubError)
    assert str(cache) in str(info.value) and "Free disk space" in str(info.value)
    if cache.is_dir():
        left = [
            p
            for p in cache.rglob("*")
            if p.is_file()
            and (p.name.endswith(".incomplete") or {"blobs", "snapshots"} & set(p.relative_to(cache).parts))
        ]
        assert not left
    assert same(
        loki.load(repo, token=server.alice, endpoint=server.url, cache_dir=tmp_path / "elsewhere"), deltas["one"]
    )  # another cache folder, as the message says


def test_hub_verbs_come_in_push_pull_pairs(server, deltas):
    """Each kind a repo holds has one push and one pull verb of the same name, and pull gives back what push sent;
    no other verb name (an old `load_..._from_hub`) is left beside them."""
    attributions = loki.attribute(tiny_model("llama"), None, [[5, 6, 7], [8, 9]], steps=2, progress=False)
    selection = loki.Selection.random(num_layers=2, d_out=32, q=10, seed=2)
    sent = {"delta": deltas["two"], "attributions": attributions, "selection": selection}
    hub = {"token": server.alice, "endpoint": server.url}
    for kind, obj in sent.items():
        getattr(loki.hub, f"push_{kind}")(obj, f"alice/pair-{kind}", **hub)
        back = getattr(loki.hub, f"pull_{kind}")(f"alice/pair-{kind}", cache_dir=constants.HF_HUB_CACHE, **hub)
        if kind == "delta":
            assert same(back, obj)
        elif kind == "attributions":
            assert torch.equal(back.values, obj.values) and torch.equal(back.targets, obj.targets)
        else:
            assert back.to_json() == obj.to_json()
    verbs = {name for name in loki.hub.__all__ if name.startswith(("push", "pull", "load"))}
    # a scope travels with its delta: push_delta(scope=) is its push verb
    assert verbs == {f"{way}_{kind}" for way in ("push", "pull") for kind in sent} | {"pull_scope"}


def test_local_paths_stay_local(tmp_path, deltas):
    with pytest.raises(errors.DeltaFormatError, match="No such file"):
        loki.load("deltas/missing.loki")  # shaped like a repo id, but a .loki path: never a Hub request
    path = loki.save(deltas["one"], tmp_path / "d" / "one.loki")
    assert same(loki.load(path), deltas["one"])
    assert same(loki.load(tmp_path / "d", filename="one.loki"), deltas["one"])
    assert loki.hub.parse_repo_id("org/name@v1") == ("org/name", "v1")
    assert loki.hub.parse_repo_id("a/b/c") is None and loki.hub.parse_repo_id("/abs/path") is None


# -- the server's own contract ----------------------------------------------------------------------
def test_server_commits_are_real(server):
    from huggingface_hub import CommitOperationAdd

    api = HfApi(endpoint=server.url, token=server.alice)
    api.create_repo("alice/git")
    c1 = api.create_commit("alice/git", [CommitOperationAdd("a.txt", b"one")], commit_message="a")
    c2 = api.create_commit("alice/git", [CommitOperationAdd("a.txt", b"two")], commit_message="b", parent_commit=c1.oid)
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit("alice/git", [CommitOperationAdd("a.txt", b"3")], commit_message="c", parent_commit=c1.oid)
    assert stale.value.response.status_code == 412
    assert [c.commit_id for c in api.list_repo_commits("alice/git")][:2] == [c2.oid, c1.oid]
    api.create_branch("alice/git", branch="old", revision=c1.oid)
    refs = api.list_repo_refs("alice/git")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2.oid, "old": c1.oid}
    assert [f.blob_id for f in api.list_repo_tree("alice/git", revision="old") if f.path == "a.txt"] == [
        hashlib.sha1(b"blob 3\0one").hexdigest()  # regular files are addressed by their git blob sha1
    ]
    api.create_tag("alice/git", tag="t", revision=c1.oid)
    assert [t.target_commit for t in api.list_repo_refs("alice/git").tags] == [c1.oid]
    api.delete_tag("alice/git", tag="t")
    api.delete_branch("alice/git", branch="old")
    assert api.list_repo_refs("alice/git").tags == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/git", revision="old")


# -- command line -----------------------------------------------------------------------------------
def test_cli_push_pull_and_offline_pull(server, deltas, tmp_path, capsys, monkeypatch):
    from loki.cli import main

    file = loki.save(deltas["two"], tmp_path / "two.loki")
    args = ["--endpoint", server.url, "--token", server.alice]
    assert main(["push", str(file), "alice/cli", "--private", "--message", "from the CLI", *args]) == 0
    assert "alice/cli @ " in capsys.readouterr().out
    assert main(["pull", "alice/cli", "--out", str(tmp_path / "copy.loki"), *args]) == 0
    assert (tmp_path / "copy.loki").read_bytes() == file.read_bytes()
    assert main(["pull", "alice/nobody", *args]) == 2
    assert "HubRepoNotFoundError" in capsys.readouterr().err

    scope = loki.scope(tiny_model("llama", layers=3), None, [{"text": [40, 41]}], [{"text": [5, 6]}], progress=False)
    scope_file = scope.save(tmp_path / "two.scope")
    assert main(["push", str(file), "alice/cli-scoped", "--scope", str(scope_file), *args]) == 0
    assert "and " + str(scope_file) in capsys.readouterr().out
    assert main(["pull", "alice/cli-scoped", "--scope", "--out", str(tmp_path / "both"), *args]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == [
        str(tmp_path / "both" / "cli-scoped.loki"),
        str(tmp_path / "both" / "cli-scoped.scope"),
    ]
    assert (tmp_path / "both" / "cli-scoped.scope").read_bytes() == scope_file.read_bytes()
    assert "scope: Scope(layer=" in printed.err
    assert main(["pull", "alice/cli", "--scope", *args]) == 2  # pushed without one
    assert "HubFileNotFoundError" in capsys.readouterr().err
    assert main(["push", str(file), "alice/cli-scoped", "--scope", str(tmp_path / "nope.scope"), *args]) == 2
    assert "ScopeError" in capsys.readouterr().err

    # Offline, with neither endpoint nor token: the cache alone answers. In process: HF_HUB_OFFLINE=1 only sets
    # huggingface_hub.constants.HF_HUB_OFFLINE when huggingface_hub is imported, and loki reads nothing else
    # (a fresh process would test huggingface_hub's import, not loki).
    server.clear()
    capsys.readouterr()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["pull", "alice/cli"]) == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == file.read_bytes()
    assert main(["pull", "alice/cli@nope"]) == 2
    assert "HubOfflineError" in capsys.readouterr().err
    assert server.count() == 0


# -- the real Hub -----------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (os.environ.get("LOKI_HUB_TEST_TOKEN") and os.environ.get("LOKI_HUB_TEST_REPO")),
    reason="set LOKI_HUB_TEST_TOKEN and LOKI_HUB_TEST_REPO (a model repo that token may write) to test the real Hub",
)
def test_real_hub_round_trip(deltas, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", XET_DISABLED_AT_IMPORT)
    token, repo = os.environ["LOKI_HUB_TEST_TOKEN"], os.environ["LOKI_HUB_TEST_REPO"]
    endpoint = os.environ.get("LOKI_HUB_TEST_ENDPOINT")  # default: the client's (HF_ENDPOINT or huggingface.co)
    commit = loki.push(deltas["one"], repo, private=True, token=token, endpoint=endpoint)
    kw = dict(token=token, endpoint=endpoint, cache_dir=constants.HF_HUB_CACHE)
    assert same(loki.load(f"{repo}@{commit.oid}", **kw), deltas["one"])
    assert same(loki.load(repo, **kw), deltas["one"])
    card = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=commit.oid).card_data
    assert card["library_name"] == "loki" and card["base_model_relation"] == "adapter"
    if HfApi(endpoint=endpoint, token=token).model_info(repo).private:  # `private=` applies when pushing creates it
        with pytest.raises(errors.HubRepoNotFoundError):
            loki.load(repo, token=False, endpoint=endpoint, cache_dir=constants.HF_HUB_CACHE)
