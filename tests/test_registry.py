import json

from cgdiff.registry import default_checkpoint, known_checkpoints, registry_problems, resolve


def test_registry_lists_only_what_exists(tiny_detector, tmp_path):
    tiny_detector.save_pretrained(tmp_path / "brick")
    (tmp_path / "brick" / "examples").mkdir()
    (tmp_path / "brick" / "examples" / "defect_000.png").write_bytes(b"")
    (tmp_path / "registry.json").write_text(json.dumps({"checkpoints": [
        {"name": "hub-one", "repo_id": "someone/cgdiff-thing", "description": "on the Hub"},
        {"name": "brick", "path": "brick", "description": "bundled"},
        {"name": "gone", "path": "gone"},
    ]}))
    entries = known_checkpoints(tmp_path)
    assert [e.name for e in entries] == ["brick", "hub-one"]  # bundled first, the missing one skipped
    assert entries[0].bundled and entries[0].examples()[0].name == "defect_000.png"
    assert any("gone" in p for p in registry_problems(tmp_path))
    assert resolve("brick", tmp_path) == str((tmp_path / "brick").resolve())
    assert resolve("hub-one", tmp_path) == "someone/cgdiff-thing"
    assert resolve("other/repo", tmp_path) == "other/repo"
    assert default_checkpoint(tmp_path).name == "brick"


def test_a_broken_registry_is_reported_not_fatal(tmp_path):
    (tmp_path / "registry.json").write_text("{broken")
    assert known_checkpoints(tmp_path) == []
    assert "not a valid registry" in registry_problems(tmp_path)[0]
