"""The host policy store: pure rules as tables, versions of a real tiny SmolVLA (shared base, lerobot-loadable
materialisation, tamper refusal), promote/rollback surviving SIGKILL at every file-system step, and the
ClientApp's evaluate step delivering each global into it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.agent.test_lease import federation, normal_scheduling  # noqa: F401 (fixtures)
from zk0.agent.policy_store import (
    CACHE_KEEP, STORE_FILE, TRAINABLE_FILE, PolicyStore, PolicyStoreError, StoreState, cache_evictions,
    prune_selection, promoted, resolve_policy, resolve_ref, rolled_back, version_name,
)

# --- pure rules -------------------------------------------------------------------------------------------

STATE = StoreState("b", "a")


@pytest.mark.parametrize("ref, state, expected", [
    ("active", STATE, "b"), ("previous", STATE, "a"), ("run1-round3", STATE, "run1-round3"),
    ("active", StoreState(), PolicyStoreError), ("previous", StoreState("b"), PolicyStoreError),
    ("../etc", STATE, PolicyStoreError), ("", STATE, PolicyStoreError),
])
def test_resolve_ref(ref, state, expected) -> None:
    if expected is PolicyStoreError:
        with pytest.raises(PolicyStoreError):
            resolve_ref(ref, state)
    else:
        assert resolve_ref(ref, state) == expected


@pytest.mark.parametrize("state, name, active, previous", [
    (StoreState(), "a", "a", None),  # the first: nothing to go back to
    (StoreState("a"), "b", "b", "a"),
    (StoreState("b", "a"), "c", "c", "b"),
    (StoreState("b", "a"), "a", "a", "b"),  # promoting previous is a rollback under another name
    (StoreState("b", "a"), "b", "b", "a"),  # already active: nothing changes, nothing recorded
])
def test_promotion_moves_active_to_previous(state, name, active, previous) -> None:
    after = promoted(state, name, "report.json", "me@host", 1.0)
    assert (after.active, after.previous) == (active, previous)
    if state.active == name:
        assert after == state
    else:
        assert after.history[-1] == {"at": 1.0, "action": "promote", "version": name, "replaced": state.active,
                                     "by": "me@host", "reason": "report.json"}


def test_rollback_swaps_and_needs_a_previous() -> None:
    once = rolled_back(STATE, "me@host", 2.0, "grasps failed")
    assert (once.active, once.previous) == ("a", "b") and once.history[-1]["action"] == "rollback"
    twice = rolled_back(once, "me@host", 3.0)
    assert (twice.active, twice.previous) == ("b", "a")
    with pytest.raises(PolicyStoreError, match="nothing to roll back to"):
        rolled_back(StoreState("a"), "me", 1.0)


V = [("v1", 10, "B"), ("v2", 10, "B"), ("v3", 10, "C"), ("v4", 10, "C"), ("v5", 10, "C")]
BASES = {"B": 100, "C": 100}


@pytest.mark.parametrize("protected, keep, max_bytes, removed", [
    (set(), None, None, []),
    (set(), 2, None, ["v1", "v2", "v3"]),
    ({"v1"}, 2, None, ["v2", "v3"]),  # active/previous stay whatever their age
    ({"v4", "v5"}, 0, None, ["v1", "v2", "v3"]),
    (set(), 10, None, []),
    (set(), None, 250, []),  # 5 x 10 + 2 bases x 100 fit
    (set(), None, 200, ["v1", "v2"]),  # v1 frees 10, v2 10 + its base B: 130
    ({"v1"}, None, 220, ["v2", "v3", "v4"]),  # v1 keeps base B: each removal frees only 10
    ({"v1", "v2"}, None, 0, ["v3", "v4", "v5"]),  # protected alone exceed the budget: they stay
    (set(), 4, 150, ["v1", "v2"]),  # keep first, then the budget
])
def test_prune_selection(protected, keep, max_bytes, removed) -> None:
    assert prune_selection(V, BASES, protected, keep, max_bytes) == removed


def test_prune_refuses_negative_limits() -> None:
    with pytest.raises(PolicyStoreError):
        prune_selection(V, BASES, set(), keep=-1)


@pytest.mark.parametrize("entries, protected, limit, evicted", [
    ([("a", 1.0), ("b", 2.0), ("c", 3.0)], {"a"}, 1, ["b"]),
    ([("a", 1.0), ("b", 2.0), ("c", 3.0)], set(), 1, ["b", "a"]),
    ([("a", 1.0), ("b", 2.0)], {"a", "b"}, 0, []),
    ([("a", 3.0), ("b", 2.0), ("c", 1.0)], {"c"}, 2, []),
])
def test_cache_evictions_keep_protected_and_most_recently_used(entries, protected, limit, evicted) -> None:
    assert cache_evictions(entries, protected, limit) == evicted


def test_version_names() -> None:
    assert version_name("run4711", 3) == "run4711-round3"
    with pytest.raises(PolicyStoreError):
        version_name("run/../x", 1)


# --- a real tiny policy -----------------------------------------------------------------------------------

class Tiny:
    """A tiny SmolVLA on a small dataset; `set_global(k)` makes it hold the k-th global (the initial trainable
    tensors + 0.01 k) and returns that global's SHA-256."""

    def __init__(self, root: Path) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

        from zk0.learn import stats as fedstats
        from zk0.learn.policy import PolicySpec, seeded_policy_bundle, trainable_state

        self.root = root
        meta = LeRobotDatasetMetadata("local/kitchen", root=root)
        self.bundle = seeded_policy_bundle(PolicySpec(model="tiny", chunk_size=10, n_action_steps=10), meta, seed=0)
        self.stats = fedstats.from_dataset(root)
        self.initial = trainable_state(self.bundle.policy)

    def set_global(self, k: int) -> str:
        from zk0.learn.codec import tensors_sha256
        from zk0.learn.policy import load_trainable_state, trainable_state

        load_trainable_state(self.bundle.policy, {n: t + 0.01 * k for n, t in self.initial.items()})
        return tensors_sha256(trainable_state(self.bundle.policy))

    def add(self, store: PolicyStore, k: int, run: str = "run1", server: dict | None = None, **metrics):
        sha = self.set_global(k)
        return store.add_from_bundle(self.bundle, run=run, round=k, stats=self.stats, server_metrics=server or {},
                                     global_sha256=sha, node_metrics=metrics)

    def actions(self, bundle) -> torch.Tensor:
        """The action chunks `bundle` predicts for two dataset frames, with fixed noise."""
        from zk0.learn.data import EpisodeData, policy_image_size
        from zk0.learn.frame_cache import FrameCache

        if not hasattr(self, "_batch"):
            data = EpisodeData(self.root, 10, policy_image_size(bundle.policy.config), FrameCache())
            self._batch = data.batch(data.frame_index()[:2])
        noise = torch.randn(2, 10, bundle.policy.config.max_action_dim, generator=torch.Generator().manual_seed(0))
        bundle.policy.eval()
        with torch.no_grad():
            return bundle.postprocessor(bundle.policy.predict_action_chunk(bundle.preprocessor(dict(self._batch)),
                                                                           noise=noise))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    from tests.learn.conftest import make_dataset

    root = tmp_path_factory.mktemp("policy-store-data") / "kitchen"
    make_dataset(root, episodes=2, frames=12)
    return Tiny(root)


# What a server sends with a round's global (zk0.server.evaluation.server_metrics), abridged.
SERVER_METRICS = {"eval/loss": 0.65, "eval/loss/kitchen": 0.65, "round/lr": 1e-4, "round/mu": 0.01,
                  "train/policy-loss": 0.72, "train/accepted-updates": 2.0}


@pytest.fixture(scope="module")
def two_versions(tiny: Tiny, tmp_path_factory) -> Path:
    """A store holding run1-round1 (active, the first received) and run1-round2 (waiting); tests copy it."""
    root = tmp_path_factory.mktemp("stores") / "policies"
    store = PolicyStore(root)
    tiny.add(store, 1, loss=0.9)
    tiny.add(store, 2, server=SERVER_METRICS, loss=0.7)
    return root


@pytest.fixture
def store(two_versions: Path, tmp_path: Path) -> PolicyStore:
    shutil.copytree(two_versions, tmp_path / "policies", symlinks=True)
    return PolicyStore(tmp_path / "policies")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_first_version_becomes_active_and_later_ones_wait(store: PolicyStore, tiny: Tiny) -> None:
    assert [v.name for v in store.versions()] == ["run1-round1", "run1-round2"]
    assert store.active.name == "run1-round1" and store.previous is None
    v2 = store.get("run1-round2")
    assert (v2.run, v2.round, v2.node_metrics, v2.server_metrics, v2.corrupt) == (
        "run1", 2, {"loss": 0.7}, SERVER_METRICS, "")
    assert v2.sha256 == tiny.set_global(2) and time.time() - 600 < v2.arrived <= time.time()
    assert store.state().history[0]["reason"] == "first version this store received"

    assert tiny.add(store, 2) == v2  # the same global delivered again: nothing new
    with pytest.raises(PolicyStoreError, match="already holds another policy"):
        store.add_from_bundle(tiny.bundle, run="run1", round=2, stats=None, server_metrics={},
                              global_sha256=tiny.set_global(5))
    with pytest.raises(PolicyStoreError, match="do not match global-sha256"):
        store.add_from_bundle(tiny.bundle, run="run1", round=3, stats=None, server_metrics={}, global_sha256="0" * 64)
    with pytest.raises(PolicyStoreError, match="unknown version"):
        store.get("run9-round9")


def test_a_first_version_written_but_never_activated_is_activated_when_delivered_again(
        store: PolicyStore, tiny: Tiny) -> None:
    """A crash between writing the first version and activating it: the next delivery of the same global (Flower
    resends the evaluate message of an unfinished round) completes what the crash interrupted."""
    (store.root / "store.json").unlink()
    shutil.rmtree(store.root / "versions" / "run1-round2")
    assert store.state().active is None
    tiny.add(store, 1, loss=0.9)
    assert store.active.name == "run1-round1"


def test_versions_share_one_base_and_cost_about_one_update(store: PolicyStore, tiny: Tiny) -> None:
    [base] = list(store.bases_dir.iterdir())
    versions = store.versions()
    trainable = [(store.versions_dir / v.name / TRAINABLE_FILE).stat().st_size for v in versions]
    full = _folder_bytes(store.checkpoint("run1-round2").resolve())
    assert all(v.base == base.name for v in versions)
    # each version: its trainable tensors + small files (config, processors, statistics), never the frozen base
    assert all(v.bytes - t < 320_000 for v, t in zip(versions, trainable))
    stored = _folder_bytes(store.versions_dir) + _folder_bytes(store.bases_dir)
    assert stored == sum(v.bytes for v in versions) + _folder_bytes(base) < 2 * full
    print(f"tiny model: version {versions[0].bytes} B (trainable {trainable[0]} B), base {_folder_bytes(base)} B, "
          f"full checkpoint {full} B")


def test_a_materialised_version_loads_with_lerobot_and_acts_like_the_bundle(store: PolicyStore, tiny: Tiny) -> None:
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from zk0.learn.checkpoint import load_checkpoint
    from zk0.learn.policy import PolicyBundle

    path = store.checkpoint("run1-round2")
    tiny.set_global(2)
    expected = tiny.actions(tiny.bundle)
    loaded, meta = load_checkpoint(path)
    torch.testing.assert_close(tiny.actions(loaded), expected)
    assert meta.round == 2 and meta.extra["version"] == "run1-round2"
    plain = SmolVLAPolicy.from_pretrained(path)  # lerobot's own loader, nothing of zk0's
    torch.testing.assert_close(tiny.actions(PolicyBundle(plain, loaded.preprocessor, loaded.postprocessor)), expected)

    target = path.resolve()
    assert store.checkpoint("run1-round2") == path and path.resolve() == target  # verified and reused
    weights = target / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    assert store.checkpoint("run1-round2").resolve() != target  # a damaged cache entry is made again
    load_checkpoint(path)
    assert resolve_policy("run1-round2", store.root) == path
    assert resolve_policy(str(path), None) == path  # a checkpoint directory is used as it is
    with pytest.raises(PolicyStoreError, match="no policy store is configured"):
        resolve_policy("active", None)


def test_the_cache_keeps_active_previous_and_the_most_recent_other(store: PolicyStore, tiny: Tiny) -> None:
    for k in (3, 4, 5):
        tiny.add(store, k)
    for k in (1, 3, 4, 5):
        store.checkpoint(f"run1-round{k}")
    cached = sorted(p.name for p in store.cache_dir.iterdir() if not p.name.startswith("."))
    assert cached == ["run1-round1", "run1-round5"] and CACHE_KEEP == 1
    assert len([p for p in store.cache_dir.iterdir() if p.name.startswith(".")]) == len(cached)


@pytest.mark.parametrize("damage, reason", [
    (lambda v: _flip(v / TRAINABLE_FILE), "trainable.safetensors does not match its SHA-256"),
    (lambda v: (v / "config.json").unlink(), "config.json is missing"),
    (lambda v: (v / "version.json").write_text("{"), "unreadable version.json"),
])
def test_a_corrupt_version_is_listed_as_such_and_refused(store: PolicyStore, damage, reason) -> None:
    damage(store.versions_dir / "run1-round2")
    before = (store.root / STORE_FILE).read_bytes()
    [corrupt] = [v for v in store.versions() if v.name == "run1-round2"]
    assert reason in corrupt.corrupt
    for attempt in (lambda: store.checkpoint("run1-round2"), lambda: store.promote("run1-round2")):
        with pytest.raises(PolicyStoreError, match="run1-round2 is corrupt, refused"):
            attempt()
    assert (store.root / STORE_FILE).read_bytes() == before and not (store.cache_dir / "run1-round2").exists()
    assert not store.get("run1-round1").corrupt


def test_a_damaged_base_makes_its_versions_corrupt(store: PolicyStore) -> None:
    [base] = list(store.bases_dir.iterdir())
    _flip(base / "frozen.safetensors")
    assert all("frozen.safetensors does not match its SHA-256" in v.corrupt for v in store.versions())
    with pytest.raises(PolicyStoreError, match="corrupt"):
        store.checkpoint("active")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_promote_rollback_and_prune(store: PolicyStore, tiny: Tiny) -> None:
    store.promote("run1-round2", reason="reports/validate-2.json")
    assert (store.active.name, store.previous.name) == ("run1-round2", "run1-round1")
    entry = store.state().history[-1]
    assert (entry["action"], entry["version"], entry["replaced"], entry["reason"]) == (
        "promote", "run1-round2", "run1-round1", "reports/validate-2.json")
    assert "@" in entry["by"]
    store.rollback(reason="drops cubes")
    assert (store.active.name, store.previous.name) == ("run1-round1", "run1-round2")
    for k in (3, 4, 5):
        tiny.add(store, k)
    assert store.prune(keep=1) == ["run1-round3", "run1-round4"]  # active and previous stay, the newest stays
    assert [v.name for v in store.versions()] == ["run1-round1", "run1-round2", "run1-round5"]
    assert store.prune(max_bytes=0) == ["run1-round5"]
    assert [v.name for v in store.versions()] == ["run1-round1", "run1-round2"]
    assert len(list(store.bases_dir.iterdir())) == 1  # still used


def test_prune_drops_a_base_nothing_uses(store: PolicyStore, tiny: Tiny) -> None:
    [base] = list(store.bases_dir.iterdir())
    fake = store.bases_dir / ("f" * 64)
    shutil.copytree(base, fake)
    assert store.prune(keep=5) == [] and not fake.exists() and base.exists()


# --- SIGKILL at every file-system step ----------------------------------------------------------------------

def _killed_at(k: int, work) -> bool:
    """Run `work()` in a forked child that SIGKILLs itself at its k-th file-system step; whether it died."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup handler runs, as in a real SIGKILL
        try:
            calls = [0]

            def dying(real):
                def step(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return step

            for module, name in ((os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"), (os, "mkdir"),
                                 (os, "fsync"), (os, "utime"), (shutil, "rmtree")):
                setattr(module, name, dying(getattr(module, name)))
            work()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"child stuck (step {k})")
        time.sleep(0.01)
    return os.WIFSIGNALED(done[1])


def _crash_sweep(tiny: Tiny, two_versions: Path, tmp_path: Path, steps) -> set[str]:
    """Kill a sequence (add round 3, promote it, roll back, promote round 2, prune) at each of `steps`; after each
    death the store must have an active policy that loads, list no broken version, and take the next write."""
    from zk0.learn.checkpoint import load_checkpoint

    def work() -> None:
        store = PolicyStore(root)
        tiny.add(store, 3)
        store.promote("run1-round3", reason="validated")
        store.rollback()
        store.promote("run1-round2")
        store.prune(keep=0)

    seen = set()
    for k in steps:
        root = tmp_path / f"k{k}"
        shutil.copytree(two_versions, root, symlinks=True)
        died = _killed_at(k, work)
        store = PolicyStore(root)
        active = store.active
        assert active is not None and not active.corrupt, f"step {k}"
        assert active.name in {"run1-round1", "run1-round2", "run1-round3"}, f"step {k}"
        assert not [v for v in store.versions() if v.corrupt], f"step {k}"
        load_checkpoint(store.checkpoint("active"))  # loads, weights checked against their SHA-256
        seen.add((active.name, died))
        store.promote("run1-round1")  # the store takes the next write, and clears what the dead one left
        assert not [p for p in (root / "versions").iterdir() if p.name.startswith(".")], f"step {k}"
        shutil.rmtree(root)
        if not died:
            break
    return {name for name, _ in seen}


def test_a_kill_at_sampled_steps_leaves_a_loadable_active_policy(tiny: Tiny, two_versions: Path, tmp_path: Path) -> None:
    _crash_sweep(tiny, two_versions, tmp_path, steps=(1, 9, 23, 41))


@pytest.mark.slow
def test_a_kill_at_any_step_leaves_a_loadable_active_policy(tiny: Tiny, two_versions: Path, tmp_path: Path) -> None:
    seen = _crash_sweep(tiny, two_versions, tmp_path, steps=range(1, 400))
    assert seen == {"run1-round1", "run1-round2", "run1-round3"}


# --- the ClientApp delivers each global ---------------------------------------------------------------------

def test_evaluate_delivers_each_global_into_the_store(federation, tmp_path: Path, normal_scheduling,  # noqa: F811
                                                      caplog) -> None:
    """With the server's metrics of it: round 1's as the server computes them, round 2's with values that are
    not finite numbers (left out, logged: the global is stored all the same)."""
    from flwr.app import ConfigRecord

    from tests.agent.test_lease import _context
    from tests.server.flower_app import ListingGrid, pushed, serverapp_identity
    from zk0.agent import client_app
    from zk0.learn.federation import GLOBAL_SHA256
    from zk0.server.evaluation import server_metrics

    root, strategy, arrays = federation
    config = {"dataset-roots": str(root), "node-name": "kitchen", "policy-store": str(tmp_path / "policies")}
    sent = {1: server_metrics({"loss": 0.8, "kitchen": 0.8}, {"policy-loss": 0.9, "num-examples": 16.0,
                                                              "accepted-updates": 1}, 1e-4, 0.01, 1),
            2: {"eval/loss": math.nan, "round/lr": math.inf, "train/accepted-updates": 0}}
    shas = []
    for server_round in (1, 2):
        with serverapp_identity():
            [msg] = pushed(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), ListingGrid([7]),
                                                       server_metrics=sent[server_round]))
        with caplog.at_level("WARNING", logger="zk0.agent.node_work"):
            reply = client_app.evaluate(msg, _context(config))
        shas.append(msg.content.config_records["config"][GLOBAL_SHA256])
        assert reply.content.metric_records["metrics"]["num-examples"] > 0
    store = PolicyStore(tmp_path / "policies")
    assert [(v.name, v.sha256) for v in store.versions()] == [("run1-round1", shas[0]), ("run1-round2", shas[1])]
    assert store.active.name == "run1-round1"  # the first; the second waits for promotion
    assert store.get("run1-round1").server_metrics == sent[1] and sent[1]["eval/loss"] == 0.8
    assert store.get("run1-round2").node_metrics["loss"] > 0
    assert store.get("run1-round2").server_metrics == {"train/accepted-updates": 0.0}
    assert [r.getMessage() for r in caplog.records if r.name == "zk0.agent.node_work"] == [
        "round 2: server metrics left out of the policy store: eval/loss=nan is not a finite number; "
        "round/lr=inf is not a finite number"]
    assert json.loads((tmp_path / "policies" / STORE_FILE).read_text())["previous"] is None

