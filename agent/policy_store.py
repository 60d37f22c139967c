"""This host's policy store: every global policy the federation delivers, kept as its trainable tensors over a
shared frozen base, with `active` / `previous` pointers that promote and rollback move atomically.

Why not one checkpoint per round: a full-size SmolVLA checkpoint is ~1.8 GB, but only the action expert and
projections (~100 M parameters, ~400 MB fp32) change between rounds. The frozen rest (VLM and every other
tensor that never trains) is stored once per base digest (`zk0.learn.federation.frozen_sha256`) and shared.

Layout of a store `<root>` (the node's `federation.policy_store`):
  store.json               active, previous and the promotion history (what, when, who, why)
  versions/<run>-round<N>/ trainable.safetensors, config.json, the pre/post processors (normalization),
                           zk0_stats.npz, version.json: run, round, arrived, sha256 (of the trainable tensors,
                           zk0.learn.codec.tensors_sha256 = the server's global-sha256), base, the SHA-256 of every
                           file, node_metrics (this node's held-out loss) and server_metrics (what the server
                           sent with the global: its held-out loss, the round's LR/mu and aggregated training
                           metrics, zk0.server.evaluation.server_metrics; empty from a server that sends none)
  bases/<frozen digest>/   frozen.safetensors, vlm/ (config + tokenizer of a local VLM), base.json
  cache/<version>          a materialised lerobot checkpoint (zk0.learn.checkpoint layout), made on demand,
                           checked by SHA-256 when reused; active, previous and the CACHE_KEEP most recently used
  .lock                    flock held by every writer (the ClientApp, `zk0 policy`, the daemon)

Crash safety: versions and bases are written whole in a hidden folder and renamed into place; store.json only
names complete versions and is replaced with tmp + fsync + rename; prune renames a version away before deleting
it and never touches active or previous. A SIGKILL at any point therefore leaves an active policy that loads;
hidden leftovers are removed by the next writer. The very first version a store receives becomes active when
none is; later ones wait to be promoted (the validation gate).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zk0.agent.policy_rules import (  # noqa: F401 (PolicyStoreError and StoreState are part of the store's API)
    POINTERS, PolicyStoreError, StoreState, cache_evictions, promoted, prune_selection, resolve_ref, rolled_back,
    version_name,
)
from zk0.learn.checkpoint import (
    STATS_FILE, WEIGHTS_FILE, CheckpointMeta, copy_local_vlm, publish_checkpoint, read_meta, sha256_file,
    write_dir_atomic, write_file_atomic,
)
from zk0.learn.policy import VLM_DIR, PolicyBundle

STORE_FILE = "store.json"
VERSION_FILE = "version.json"
BASE_FILE = "base.json"
TRAINABLE_FILE = "trainable.safetensors"
FROZEN_FILE = "frozen.safetensors"
CACHE_KEEP = 1  # materialised checkpoints kept besides active and previous (each is a whole model)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    run: str = ""
    round: int = -1
    arrived: float = 0.0  # epoch seconds when the node stored it
    sha256: str = ""  # of the trainable tensors (codec.tensors_sha256): the server's global-sha256
    base: str = ""  # frozen_sha256 of the shared frozen weights
    bytes: int = 0  # of this version's own folder (the base is shared)
    server_metrics: dict[str, float] = field(default_factory=dict)
    node_metrics: dict[str, float] = field(default_factory=dict)
    corrupt: str = ""  # why it cannot be loaded; "" when every file matches its SHA-256


# ------------------------------------------------------------------------------------------------ the store

def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _rmtree_via_trash(path: Path) -> None:
    """Rename away (one atomic step: `path` is gone or whole), then delete."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


class PolicyStore:
    """The store at `root`; reading never creates anything, writers serialise on `<root>/.lock`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir, self.bases_dir, self.cache_dir = (self.root / d for d in ("versions", "bases", "cache"))
        self._verified: dict[Path, tuple[str, int, int, int]] = {}  # file -> (sha256, size, mtime, inode) hashed

    # --- reading
    def state(self) -> StoreState:
        try:
            raw = json.loads((self.root / STORE_FILE).read_text())
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValueError) as exc:
            raise PolicyStoreError(f"{self.root / STORE_FILE} is unreadable: {exc}") from None
        return StoreState(raw.get("active"), raw.get("previous"), tuple(raw.get("history", ())))

    def versions(self) -> list[VersionInfo]:
        """Every version, oldest first, each verified (a corrupt one says why in `corrupt`)."""
        return self._list(verify=True)

    def get(self, ref: str) -> VersionInfo:
        name = resolve_ref(ref, self.state())
        if ref not in POINTERS and not (self.versions_dir / name).is_dir():
            raise PolicyStoreError(f"unknown version {ref!r} in {self.root}")
        return self._info(name, verify=True, bases={})

    @property
    def active(self) -> VersionInfo | None:
        return self.get("active") if self.state().active else None

    @property
    def previous(self) -> VersionInfo | None:
        return self.get("previous") if self.state().previous else None

    def checkpoint(self, ref: str) -> Path:
        """A lerobot checkpoint directory of `ref` (loads with load_checkpoint and SmolVLAPolicy.from_pretrained),
        materialised into cache/ on first use and reused while its SHA-256 matches."""
        with self._lock():
            return self._materialised(self._loadable(ref))

    # --- writing
    def add_checkpoint(self, checkpoint: Path, run: str) -> VersionInfo:
        """Store a lerobot checkpoint (e.g. a base every host starts from) as version `<run>-round0`."""
        from zk0.learn.checkpoint import load_checkpoint
        from zk0.learn.codec import tensors_sha256
        from zk0.learn.policy import trainable_state

        bundle, _ = load_checkpoint(checkpoint)
        return self.add_from_bundle(bundle, run=run, round=0, stats=None, server_metrics={},
                                    global_sha256=tensors_sha256(trainable_state(bundle.policy)))

    def add_from_bundle(self, bundle: PolicyBundle, *, run: str, round: int, stats,
                        server_metrics: Mapping[str, float], global_sha256: str,
                        node_metrics: Mapping[str, float] | None = None) -> VersionInfo:
        """Store the global `bundle` holds as version `<run>-round<N>`; `stats`: SufficientStats or None.
        Delivering the same global again is a no-op; another policy under an existing name is refused."""
        from safetensors.torch import save_file

        from zk0.learn.codec import tensors_sha256
        from zk0.learn.federation import frozen_sha256
        from zk0.learn.policy import trainable_state

        name = version_name(run, round)
        tensors = trainable_state(bundle.policy)
        if tensors_sha256(tensors) != global_sha256:
            raise PolicyStoreError(f"{name}: the policy's trainable tensors do not match global-sha256 {global_sha256[:12]}")
        with self._lock():
            if (self.versions_dir / name).is_dir():
                existing = self._info(name, verify=True, bases={})
                if existing.corrupt:
                    raise PolicyStoreError(f"{name} is already stored, corrupt: {existing.corrupt}")
                if existing.sha256 != global_sha256:
                    raise PolicyStoreError(f"{name} already holds another policy (sha {existing.sha256[:12]})")
                self._activate_first(name)  # a crash may have come between writing it and activating it
                return existing
            base = self._ensure_base(bundle.policy, frozen_sha256(bundle.policy))

            def write(folder: Path) -> None:
                save_file(tensors, folder / TRAINABLE_FILE, metadata={"format": "pt"})
                bundle.policy.config.save_pretrained(folder)
                bundle.preprocessor.save_pretrained(folder)
                bundle.postprocessor.save_pretrained(folder)
                if stats is not None:
                    import numpy as np

                    np.savez(folder / STATS_FILE, **stats.to_record())
                meta = {"name": name, "run": run, "round": round, "arrived": time.time(), "sha256": global_sha256,
                        "base": base, "files": {p.name: sha256_file(p) for p in sorted(folder.iterdir())},
                        "node_metrics": dict(node_metrics or {}), "server_metrics": dict(server_metrics)}
                (folder / VERSION_FILE).write_text(json.dumps(meta, indent=2))

            write_dir_atomic(self.versions_dir / name, write)
            self._activate_first(name)
        return self._info(name, verify=False, bases={})

    def _activate_first(self, name: str) -> None:
        """The first version a store receives becomes active (the caller holds the lock)."""
        state = self.state()
        if state.active is None:
            self._write_state(promoted(state, name, "first version this store received", _who(), time.time()))

    def promote(self, ref: str, reason: str = "") -> None:
        """Make `ref` active (the active one becomes previous); refused for a corrupt version. The checkpoint is
        materialised first, so whoever loads the active policy next finds it ready."""
        with self._lock():
            info = self._loadable(ref)
            self._materialised(info)
            state = self.state()
            self._write_state(promoted(state, info.name, reason, _who(), time.time()))

    def rollback(self, reason: str = "") -> None:
        """Swap active and previous (the previous version must load)."""
        with self._lock():
            after = rolled_back(self.state(), _who(), time.time(), reason)
            self._materialised(self._loadable("previous"))
            self._write_state(after)

    def prune(self, keep: int | None = None, max_bytes: int | None = None) -> list[str]:
        """Remove old versions (see `prune_selection`), their cached checkpoints and bases nothing uses any
        more; never active or previous. Returns the names removed."""
        with self._lock():
            state, infos = self.state(), self._list(verify=False)
            bases = {b.name: _folder_bytes(b) for b in self._entries(self.bases_dir)}
            protected = {n for n in (state.active, state.previous) if n}
            chosen = prune_selection([(i.name, i.bytes, i.base) for i in infos], bases, protected, keep, max_bytes)
            for name in chosen:
                self._drop_cache(name)
                _rmtree_via_trash(self.versions_dir / name)
            used = {i.base for i in infos if i.name not in chosen}
            for base in set(bases) - used:
                _rmtree_via_trash(self.bases_dir / base)
            return chosen

    # --- internals
    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive over writers; released by the kernel if the holder dies. Clears what dead writers left."""
        for folder in (self.versions_dir, self.bases_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._clear_leftovers()
            yield

    def _clear_leftovers(self) -> None:
        for folder in (self.versions_dir, self.bases_dir):
            for path in folder.iterdir():
                if path.name.startswith("."):
                    shutil.rmtree(path, ignore_errors=True)
        targets = {p.readlink().name for p in self._entries(self.cache_dir) if p.is_symlink()}
        for path in self.cache_dir.iterdir():
            if path.name.startswith(".") and path.name not in targets:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in [*self.root.glob(f".{STORE_FILE}.tmp-*"), *self.versions_dir.glob(f"*/.{VERSION_FILE}.tmp-*")]:
            path.unlink()

    def _write_state(self, state: StoreState) -> None:
        write_file_atomic(self.root / STORE_FILE, json.dumps(asdict(state), indent=2).encode())

    @staticmethod
    def _entries(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def _list(self, verify: bool) -> list[VersionInfo]:
        bases: dict[str, str] = {}
        infos = [self._info(p.name, verify, bases) for p in self._entries(self.versions_dir)]
        return sorted(infos, key=lambda i: (i.arrived, i.name))

    def _info(self, name: str, verify: bool, bases: dict[str, str]) -> VersionInfo:
        """The version's metadata, `corrupt` saying what does not match (SHA-256 of each file when `verify`,
        presence otherwise). `bases` memoises base checks within one call."""
        folder = self.versions_dir / name
        try:
            meta = json.loads((folder / VERSION_FILE).read_text())
            info = VersionInfo(name, str(meta["run"]), int(meta["round"]), float(meta["arrived"]), str(meta["sha256"]),
                               str(meta["base"]), _folder_bytes(folder), dict(meta.get("server_metrics", {})),
                               dict(meta.get("node_metrics", {})))
            files = dict(meta["files"])
        except FileNotFoundError:
            return VersionInfo(name, corrupt="version folder missing" if not folder.is_dir() else f"no {VERSION_FILE}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return VersionInfo(name, bytes=_folder_bytes(folder), corrupt=f"unreadable {VERSION_FILE}: {exc}")
        problem = self._files_problem(folder, files, verify)
        if not problem:
            if info.base not in bases:
                bases[info.base] = self._base_problem(info.base, verify)
            problem = bases[info.base]
        return replace(info, corrupt=problem)

    def _base_problem(self, digest: str, verify: bool) -> str:
        folder = self.bases_dir / digest
        try:
            files = dict(json.loads((folder / BASE_FILE).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"base {digest[:12]} missing or unreadable"
        problem = self._files_problem(folder, files, verify)
        return f"base {digest[:12]}: {problem}" if problem else ""

    def _files_problem(self, folder: Path, files: Mapping[str, str], verify: bool) -> str:
        """The first file missing or (when `verify`) not matching its SHA-256; "" when all are intact. A file
        is hashed once per process while its size, mtime and inode stay (a base is ~1.5 GB at full size)."""
        for rel, digest in files.items():
            try:
                st = (folder / rel).stat()
            except OSError:
                return f"{rel} is missing"
            seen = (digest, st.st_size, st.st_mtime_ns, st.st_ino)
            if verify and self._verified.get(folder / rel) != seen:
                if sha256_file(folder / rel) != digest:
                    return f"{rel} does not match its SHA-256 (damaged or tampered)"
                self._verified[folder / rel] = seen
        return ""

    def _loadable(self, ref: str) -> VersionInfo:
        info = self.get(ref)
        if info.corrupt:
            raise PolicyStoreError(f"version {info.name} is corrupt, refused: {info.corrupt}")
        return info

    def _ensure_base(self, policy: Any, digest: str) -> str:
        """Store the frozen tensors once per digest, in the layout lerobot's save_pretrained writes them."""
        from safetensors import safe_open
        from safetensors.torch import save_file, save_model

        from zk0.learn.policy import trainable_names

        if (self.bases_dir / digest / BASE_FILE).is_file():
            return digest

        def write(folder: Path) -> None:
            full = folder / WEIGHTS_FILE
            save_model(policy, str(full))
            trainable = set(trainable_names(policy))
            with safe_open(str(full), "pt") as f:
                metadata = f.metadata() or {}
                frozen = {k: f.get_tensor(k) for k in f.keys() if k not in trainable}
            save_file(frozen, folder / FROZEN_FILE, metadata={"format": "pt", **metadata})
            full.unlink()
            copy_local_vlm(policy.config.vlm_model_name, folder / VLM_DIR)
            files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
            (folder / BASE_FILE).write_text(json.dumps({"digest": digest, "files": files}, indent=2))

        write_dir_atomic(self.bases_dir / digest, write)
        return digest

    def _materialised(self, info: VersionInfo) -> Path:
        out = self.cache_dir / info.name
        if not _cache_matches(out, info):
            publish_checkpoint(out, lambda folder: self._assemble(info, folder))
        os.utime(out, follow_symlinks=False)
        state = self.state()
        entries = [(p.name, p.lstat().st_mtime) for p in self._entries(self.cache_dir)]
        protected = {n for n in (state.active, state.previous) if n}  # `out` is the most recently used
        for name in cache_evictions(entries, protected, CACHE_KEEP):
            self._drop_cache(name)
        return out

    def _assemble(self, info: VersionInfo, folder: Path) -> CheckpointMeta:
        """A lerobot checkpoint from the version's files and its base: model.safetensors is base + trainable."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        version, base = self.versions_dir / info.name, self.bases_dir / info.base
        with safe_open(str(base / FROZEN_FILE), "pt") as f:
            metadata = f.metadata()
        tensors = {**load_file(base / FROZEN_FILE), **load_file(version / TRAINABLE_FILE)}
        folder.mkdir()
        save_file(tensors, folder / WEIGHTS_FILE, metadata=metadata)
        for path in version.iterdir():
            if path.name not in (TRAINABLE_FILE, VERSION_FILE):
                shutil.copy2(path, folder / path.name)
        if (base / VLM_DIR).is_dir():
            shutil.copytree(base / VLM_DIR, folder / VLM_DIR)
        trainable = sorted(load_file(version / TRAINABLE_FILE))
        return CheckpointMeta(run=info.run, round=info.round, trainable=trainable,
                              extra={"version": info.name, "version-sha256": info.sha256, "base": info.base})

    def _drop_cache(self, name: str) -> None:
        link = self.cache_dir / name
        if link.is_symlink():
            target = self.cache_dir / link.readlink()
            link.unlink()
            shutil.rmtree(target, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _cache_matches(out: Path, info: VersionInfo) -> bool:
    """Whether `out` is this version's materialised checkpoint with its weights intact."""
    try:
        meta = read_meta(out)
        return (meta.extra.get("version-sha256") == info.sha256 and meta.extra.get("base") == info.base
                and sha256_file(out / WEIGHTS_FILE) == meta.sha256)
    except (OSError, ValueError, TypeError):
        return False


def resolve_policy(ref: str, store_root: Path | None) -> Path:
    """A loadable lerobot checkpoint directory for `ref`: an existing checkpoint directory as is, else a version
    of the store at `store_root` (a name, "active" or "previous"), materialised. What `--policy X` accepts."""
    path = Path(ref)
    if "/" in ref and not path.is_dir():
        raise PolicyStoreError(f"no checkpoint directory at {ref}")
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / WEIGHTS_FILE).is_file():
            raise PolicyStoreError(f"{ref}: not a lerobot checkpoint (needs config.json and {WEIGHTS_FILE})")
        return path
    if store_root is None:
        raise PolicyStoreError(f"{ref!r} is not a checkpoint directory, and no policy store is configured")
    if not Path(store_root).is_dir():
        raise PolicyStoreError(f"{ref!r} is not a checkpoint directory, and there is no policy store at {store_root}")
    return PolicyStore(Path(store_root)).checkpoint(ref)
