"""The policy store's decisions, as pure functions of its state (zk0.agent.policy_store is the I/O around
them): what a reference names, what promote and rollback leave, which versions pruning removes, which cached
checkpoints go."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POINTERS = ("active", "previous")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


class PolicyStoreError(ValueError):
    """A refused request (unknown version, corrupt version, nothing to roll back to); one line saying why."""


@dataclass(frozen=True)
class StoreState:
    active: str | None = None
    previous: str | None = None
    history: tuple[dict[str, Any], ...] = ()  # {"at", "action", "version", "replaced", "by", "reason"}


def version_name(run: str, round: int) -> str:
    """`<run>-round<N>`; the ClientApp's run is `run<Flower run id>`, unique per run and round."""
    name = f"{run}-round{round}"
    if not _NAME.fullmatch(name):
        raise PolicyStoreError(f"version name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def resolve_ref(ref: str, state: StoreState) -> str:
    """The version name `ref` means: a pointer ("active", "previous") or a version name."""
    if ref in POINTERS:
        name = getattr(state, ref)
        if name is None:
            raise PolicyStoreError(f"the store has no {ref} version")
        return name
    if not _NAME.fullmatch(ref):
        raise PolicyStoreError(f"{ref!r} is not a version name")
    return ref


def promoted(state: StoreState, name: str, reason: str, by: str, at: float) -> StoreState:
    """`name` becomes active and the active one previous (a no-op when `name` is already active)."""
    if state.active == name:
        return state
    entry = {"at": at, "action": "promote", "version": name, "replaced": state.active, "by": by, "reason": reason}
    return StoreState(name, state.active if state.active is not None else state.previous, (*state.history, entry))


def rolled_back(state: StoreState, by: str, at: float, reason: str = "") -> StoreState:
    """active and previous swap places (a second rollback undoes the first)."""
    if state.previous is None:
        raise PolicyStoreError("nothing to roll back to: the store has no previous version")
    entry = {"at": at, "action": "rollback", "version": state.previous, "replaced": state.active, "by": by,
             "reason": reason}
    return StoreState(state.previous, state.active, (*state.history, entry))


def parse_size(text: str) -> int:
    """Bytes from `123`, `500M`, `1.5G`, `2GiB` (powers of 1024); ValueError for anything else."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def prune_selection(versions: Sequence[tuple[str, int, str]], base_bytes: Mapping[str, int], protected: set[str],
                    keep: int | None = None, max_bytes: int | None = None) -> list[str]:
    """Versions to remove, oldest first. `versions`: (name, bytes, base digest), oldest first.

    keep: at most this many versions stay (the newest), besides protected ones (active, previous), which always
    stay; max_bytes: then the oldest unprotected ones go until versions plus the bases they use fit (a store
    whose protected versions alone exceed it stays above the budget).
    """
    if keep is not None and keep < 0 or max_bytes is not None and max_bytes < 0:
        raise PolicyStoreError("prune: keep and max_bytes must be >= 0")
    removable = [v for v in versions if v[0] not in protected]
    newest = {v[0] for v in versions[::-1][:keep]} if keep is not None else {v[0] for v in versions}
    chosen = [v for v in removable if v[0] not in newest]
    if max_bytes is not None:
        left = [v for v in versions if v not in chosen]
        total = sum(v[1] for v in left) + sum(base_bytes.get(b, 0) for b in {v[2] for v in left})
        for v in [v for v in removable if v not in chosen]:
            if total <= max_bytes:
                break
            chosen.append(v)
            left.remove(v)
            total -= v[1] + (base_bytes.get(v[2], 0) if v[2] not in {w[2] for w in left} else 0)
    order = [v[0] for v in versions]
    return sorted((v[0] for v in chosen), key=order.index)


def cache_evictions(entries: Sequence[tuple[str, float]], protected: set[str], limit: int) -> list[str]:
    """Cached checkpoints to drop: all but the `limit` most recently used among those not protected.
    `entries`: (version, last used)."""
    others = sorted((e for e in entries if e[0] not in protected), key=lambda e: e[1], reverse=True)
    return [name for name, _ in others[limit:]]
