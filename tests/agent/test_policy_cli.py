"""`zk0 policy` through the `zk0` dispatcher: the table, show, promote/rollback, prune, export to a standalone
lerobot checkpoint, the store named by --store or the agent config, and bad input answered with one line that
changes nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from tests.agent.test_policy_store import _flip, store, tiny, two_versions  # noqa: F401 (fixtures)
from zk0.agent.policy_cli import size_argument
from zk0.agent.policy_rules import parse_size
from zk0.agent.policy_store import STORE_FILE, TRAINABLE_FILE, PolicyStore
from zk0.cli import main


def zk0(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text, size", [("123", 123), ("500M", 500 * 2**20), ("1.5G", int(1.5 * 2**30)),
                                        ("2GiB", 2 * 2**30), ("4kb", 4096)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_size("lots")
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: 'lots'"):  # argparse shows the reason
        size_argument("lots")


def test_list_show_promote_rollback(store: PolicyStore, capsys) -> None:
    code, out, _ = zk0(capsys, "list", "--store", str(store.root))
    header, first, second = out.splitlines()
    assert code == 0 and header.split()[:5] == ["version", "round", "arrived", "sha", "size"]
    assert first.split()[:3] == ["active", "run1-round1", "1"] and "loss=0.9" in first and first.endswith("ok")
    assert second.split()[:2] == ["run1-round2", "2"] and store.get("run1-round2").sha256[:12] in second
    # the server's held-out loss and whether the round changed the global; `show` has the rest
    assert "eval/loss=0.65 train/accepted-updates=2  loss=0.7" in second and "round/lr" not in second
    assert "  -  " in first  # round 1 came with no server metrics

    assert zk0(capsys, "--store", str(store.root), "promote", "run1-round2", "--reason", "reports/v2.json")[:2] == (
        0, "active: run1-round2 (previous: run1-round1)\n")
    code, out, _ = zk0(capsys, "show", "active", "--store", str(store.root))
    assert code == 0 and "version:        run1-round2" in out and "status:         active" in out
    assert ("server metrics: eval/loss=0.65\n                eval/loss/kitchen=0.65\n                round/lr=0.0001\n"
            "                round/mu=0.01\n                train/policy-loss=0.72\n"
            "                train/accepted-updates=2\nnode metrics:   loss=0.7\n") in out
    assert "promote run1-round2 (replacing run1-round1)" in out and out.rstrip().endswith(": reports/v2.json")
    assert zk0(capsys, "rollback", "--store", str(store.root))[:2] == (
        0, "rolled back: active run1-round1 (previous: run1-round2)\n")
    assert zk0(capsys, "promote", "run1-round1", "--store", str(store.root))[1] == "run1-round1 is already active\n"


def _refused(capsys, store: PolicyStore, *argv: str) -> str:
    """Run a request that must be refused: exit 1, one line on stderr, the store unchanged."""
    before = (store.root / STORE_FILE).read_bytes()
    code, out, err = zk0(capsys, *argv, "--store", str(store.root))
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("zk0 policy: ")
    assert (store.root / STORE_FILE).read_bytes() == before
    return err.strip()


def test_bad_input_gets_one_line_and_changes_nothing(store: PolicyStore, capsys, tmp_path: Path) -> None:
    assert "unknown version 'run9-round9'" in _refused(capsys, store, "promote", "run9-round9")
    assert "nothing to roll back to" in _refused(capsys, store, "rollback")
    assert "prune needs --keep N and/or --max-bytes SIZE" in _refused(capsys, store, "prune")
    assert "is not a version name" in _refused(capsys, store, "show", "../x")
    _flip(store.versions_dir / "run1-round2" / TRAINABLE_FILE)
    line = _refused(capsys, store, "promote", "run1-round2")
    assert line == ("zk0 policy: version run1-round2 is corrupt, refused: "
                    "trainable.safetensors does not match its SHA-256 (damaged or tampered)")
    assert "is corrupt, refused" in _refused(capsys, store, "export", "run1-round2", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    listed = zk0(capsys, "list", "--store", str(store.root))[1].splitlines()[2]
    assert listed.split()[0] == "run1-round2" and "CORRUPT: trainable.safetensors does not match" in listed
    code, _, err = zk0(capsys, "list", "--store", str(tmp_path / "nowhere"))
    assert code == 1 and err == f"zk0 policy: no policy store at {tmp_path / 'nowhere'}\n"


def test_prune_keeps_active_and_previous(store: PolicyStore, tiny, capsys) -> None:  # noqa: F811
    tiny.add(store, 3)
    store.promote("run1-round3")
    tiny.add(store, 4)
    assert zk0(capsys, "prune", "--keep", "4", "--store", str(store.root))[:2] == (0, "nothing to remove\n")
    assert zk0(capsys, "prune", "--max-bytes", "1k", "--store", str(store.root))[:2] == (0, "removed 2: run1-round2, run1-round4\n")
    assert [v.name for v in store.versions()] == ["run1-round1", "run1-round3"]


def test_export_writes_a_standalone_lerobot_checkpoint(store: PolicyStore, capsys, tmp_path: Path) -> None:
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from zk0.learn.checkpoint import load_checkpoint

    out = tmp_path / "exported" / "kitchen-v2"
    assert zk0(capsys, "export", "run1-round2", str(out), "--store", str(store.root))[:2] == (
        0, f"exported run1-round2 to {out}\n")
    assert out.is_dir() and not out.is_symlink() and not any(p.is_symlink() for p in out.rglob("*"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["kitchen-v2"]
    _, meta = load_checkpoint(out)
    assert meta.extra["version-sha256"] == store.get("run1-round2").sha256
    SmolVLAPolicy.from_pretrained(out)
    capsys.readouterr()  # what lerobot printed while loading
    assert "exists: export writes a new directory" in _refused(capsys, store, "export", "active", str(out))


def test_the_store_comes_from_the_agent_config(store: PolicyStore, capsys, tmp_path: Path) -> None:
    from tests.agent.test_config import VALID

    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({**VALID, "federation": {
        "superlink": "fl:9093", "datasets": ["kitchen"], "insecure": True, "policy_store": str(store.root)}}))
    code, out, _ = zk0(capsys, "list", "--config", str(config))
    assert code == 0 and "run1-round1" in out
    config.write_text(yaml.safe_dump(VALID))
    code, _, err = zk0(capsys, "list", "--config", str(config))
    assert code == 1 and err == f"zk0 policy: {config} has no federation section: give --store DIR\n"
    code, _, err = zk0(capsys, "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 1 and "config file not found" in err and err.count("\n") == 1


def test_export_onnx_and_parity(store: PolicyStore, capsys, tmp_path: Path) -> None:
    """An int8 export of a store version through the CLI, its parity (no max-abs tolerance for int8: exit 0),
    and the refusals: an existing directory, an export compared with other weights."""
    import json

    from zk0.learn.onnx_export import read_manifest

    out = tmp_path / "onnx"
    code, stdout, _ = zk0(capsys, "export-onnx", "run1-round2", str(out), "--quantize", "int8", "--steps", "3",
                          "--store", str(store.root))
    assert code == 0 and stdout.splitlines()[-1].startswith("exported run1-round2 (sha ") and "int8, 3 steps" in stdout
    manifest = read_manifest(out)
    assert (manifest.quantize, manifest.steps, manifest.tolerance) == ("int8", 3, None)
    assert manifest.source_sha256 == json.loads((store.checkpoint("run1-round2") / "zk0.json").read_text())["sha256"]
    code, stdout, _ = zk0(capsys, "parity", "run1-round2", str(out), "--trials", "1", "--store", str(store.root))
    result = json.loads(stdout.splitlines()[-1])
    assert code == 0 and result["quantize"] == "int8" and result["passed"] is None and result["steps"] == 3
    assert "exists: export-onnx writes a new directory" in _refused(capsys, store, "export-onnx", "active", str(out))
    assert "was exported from weights" in _refused(capsys, store, "parity", "run1-round1", str(out))


def test_import_stores_a_checkpoint_as_a_version_and_may_activate_it(store: PolicyStore, tmp_path: Path, capsys) -> None:
    """A base every host starts from arrives as a lerobot checkpoint: exported from one store, imported into a
    fresh one as base-round0 with the same trainable tensors."""
    assert zk0(capsys, "export", "run1-round2", str(tmp_path / "base"), "--store", str(store.root))[0] == 0
    fresh = PolicyStore(tmp_path / "fresh")
    code, out, _ = zk0(capsys, "import", str(tmp_path / "base"), "--activate", "--store", str(fresh.root))
    assert code == 0 and "stored base-round0" in out.splitlines()  # after lerobot's own loading chatter
    assert fresh.state().active == "base-round0"
    assert fresh.get("base-round0").sha256 == store.get("run1-round2").sha256
    code, _, err = zk0(capsys, "import", str(tmp_path), "--store", str(fresh.root))
    assert code == 1 and "is not a checkpoint directory" in err
