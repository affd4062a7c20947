"""Known checkpoints: the ones bundled in `checkpoints/` and published ones on the Hub.

`checkpoints/registry.json` lists them:

    {"checkpoints": [
        {"name": "brick", "path": "brick", "description": "..."},          bundled (relative path)
        {"name": "mvtec-leather", "repo_id": "owner/cgdiff-mvtec-leather", "description": "..."}
    ]}

Only entries that really exist belong there: a bundled folder that is missing is skipped
(with the reason available from `registry_problems`). Any other Hub repo id or local folder
works too; `resolve` passes those through unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .hub import CONFIG_NAME

REGISTRY_NAME = "registry.json"


def checkpoints_dir() -> Path:
    """`$CGDIFF_CHECKPOINTS`, else the repository's `checkpoints/` folder."""
    env = os.environ.get("CGDIFF_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "checkpoints"


@dataclass(frozen=True)
class Entry:
    name: str
    description: str = ""
    path: Optional[Path] = None  # bundled: absolute folder
    repo_id: Optional[str] = None  # on the Hub

    @property
    def bundled(self) -> bool:
        return self.path is not None

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else str(self.repo_id)

    def examples(self) -> list[Path]:
        """Example images shipped with a bundled checkpoint (examples/*.png), sorted."""
        if self.path is None or not (self.path / "examples").is_dir():
            return []
        return sorted((self.path / "examples").glob("*.png"))


def _read(folder: Path) -> tuple[list[Entry], list[str]]:
    entries, problems = [], []
    path = folder / REGISTRY_NAME
    if not path.is_file():
        return entries, [f"no {REGISTRY_NAME} in {folder}"]
    try:
        raw = json.loads(path.read_text())["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return entries, [f"{path} is not a valid registry: {e}"]
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"skipped a registry entry without a name: {item!r}")
            continue
        name, description = item["name"], str(item.get("description", ""))
        if "path" in item:
            local = (folder / str(item["path"])).resolve()
            if not (local / CONFIG_NAME).is_file():
                problems.append(f"bundled checkpoint '{name}' is missing ({local})")
                continue
            entries.append(Entry(name, description, path=local))
        elif "repo_id" in item:
            entries.append(Entry(name, description, repo_id=str(item["repo_id"])))
        else:
            problems.append(f"registry entry '{name}' has neither 'path' nor 'repo_id'")
    return entries, problems


def known_checkpoints(folder: Optional[Path] = None) -> list[Entry]:
    """Registry entries, bundled first, in registry order."""
    entries, _ = _read(folder or checkpoints_dir())
    return sorted(entries, key=lambda e: not e.bundled)


def registry_problems(folder: Optional[Path] = None) -> list[str]:
    return _read(folder or checkpoints_dir())[1]


def resolve(name_or_path: str, folder: Optional[Path] = None) -> str:
    """A registry name -> its folder or repo id; anything else is returned unchanged."""
    for entry in known_checkpoints(folder):
        if entry.name == name_or_path:
            return entry.location
    return name_or_path


def default_checkpoint(folder: Optional[Path] = None) -> Optional[Entry]:
    """The first bundled checkpoint (works offline), else the first entry, else None."""
    entries = known_checkpoints(folder)
    return entries[0] if entries else None
