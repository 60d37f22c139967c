"""Round results for the agent's event stream: the global policies that arrive in this host's policy store.

The node's evaluate step (zk0.agent.node_work, in the ClientApp or the learning worker) delivers each round's
global into the store; the agent, which never imports torch, only watches the store's `versions/` folder and
announces each new version with its round and the node's held-out loss (`round` events, zk0.agent.events).
Versions are renamed into place whole, so a visible folder without a readable version.json is a corrupt one,
announced as such rather than skipped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VERSION_FILE = "version.json"


def version_names(versions_dir: Path) -> set[str]:
    """The complete versions in a store's `versions/` folder (hidden names are still being written)."""
    try:
        return {entry.name for entry in versions_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    except FileNotFoundError:
        return set()


def round_result(version_dir: Path) -> dict[str, Any]:
    """A `round` event's fields for the version in `version_dir`."""
    try:
        info = json.loads((version_dir / VERSION_FILE).read_text())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return {"version": version_dir.name, "error": f"unreadable {VERSION_FILE}: {exc}"}
    return {"version": version_dir.name, "run": info.get("run"), "round": info.get("round"),
            "node_metrics": info.get("node_metrics") or {}}


class ArrivalWatch:
    """Versions that appeared since the last look (those present at start are not news)."""

    def __init__(self, versions_dir: Path) -> None:
        self.versions_dir = versions_dir
        self._known = version_names(versions_dir)

    def new_results(self) -> list[dict[str, Any]]:
        present = version_names(self.versions_dir)
        new, self._known = sorted(present - self._known), present
        return [round_result(self.versions_dir / name) for name in new]
