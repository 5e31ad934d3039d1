"""EdgeSettings: typed SPLITCLIP_* variables (parsed by splitclip.settings), overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.settings import EdgeSettings
from splitclip.settings import SettingsError


def test_reads_typed_values_from_the_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    env = {
        "SPLITCLIP_CLOUD": "cloud:9000",
        "SPLITCLIP_NODE_ID": "cam-7",
        "SPLITCLIP_NODE_TOKEN_FILE": str(token),
        "SPLITCLIP_TLS_CA": "/etc/ca.pem",
        "SPLITCLIP_CUT": "3",
        "SPLITCLIP_CODEC": "fp16",
        "SPLITCLIP_FRAME_DEADLINE_S": "1.5",
        "SPLITCLIP_WINDOW": "4",
    }
    s = EdgeSettings.from_env(env)
    assert (s.cloud, s.node_id, s.node_token, s.cut, s.codec) == ("cloud:9000", "cam-7", "s3cret", 3, "fp16")
    assert s.tls_ca == Path("/etc/ca.pem") and s.frame_deadline_s == 1.5 and s.window == 4


def test_overrides_win_and_none_does_not_override() -> None:
    s = EdgeSettings.from_env(
        {"SPLITCLIP_CUT": "3", "SPLITCLIP_NODE_TOKEN": "a"}, cut=5, cloud=None, window="2"
    )
    assert s.cut == 5 and s.cloud is None and s.window == 2 and s.node_token == "a"
    assert s.node_id.startswith("edge-")


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("SPLITCLIP_WINDOW", "0", "window must be >= 1, got 0"),
        ("SPLITCLIP_CUT", "three", "SPLITCLIP_CUT='three' is not a valid int"),
        ("SPLITCLIP_FRAME_DEADLINE_S", "soon", "SPLITCLIP_FRAME_DEADLINE_S='soon' is not a valid float"),
        ("SPLITCLIP_CLOUD", "noport", "cloud must be HOST:PORT, got 'noport'"),
    ],
)
def test_rejects_bad_values(var: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as e:  # a ValueError too, for callers that catch that
        EdgeSettings.from_env({var: value})
    assert str(e.value) == message


def test_rejects_unknown_overrides() -> None:
    with pytest.raises(SettingsError, match="unknown edge setting 'windows'"):
        EdgeSettings.from_env({}, windows=2)


def test_fleet_search_settings_and_the_journal_path(tmp_path: Path) -> None:
    s = EdgeSettings.from_env({"SPLITCLIP_NODE_ID": "gate 3/a"}, cache_dir=tmp_path)
    assert not s.index and s.upload_batch == 64 and s.upload_rate_per_s == 200.0
    # one journal per node id and bundle, under the cache dir; the node id made a file name
    assert s.journal_path("b-1") == tmp_path / "journal" / "gate_3_a--b-1.sqlite"
    env = {
        "SPLITCLIP_INDEX": "true",
        "SPLITCLIP_JOURNAL": str(tmp_path / "j.sqlite"),
        "SPLITCLIP_UPLOAD_BATCH": "8",
        "SPLITCLIP_UPLOAD_RATE_PER_S": "50",
    }
    s = EdgeSettings.from_env(env)
    assert s.index and s.journal_path("b-1") == tmp_path / "j.sqlite"
    assert (s.upload_batch, s.upload_rate_per_s) == (8, 50.0)
    for bad in ({"SPLITCLIP_UPLOAD_BATCH": "0"}, {"SPLITCLIP_UPLOAD_RATE_PER_S": "0"}):
        with pytest.raises(SettingsError, match="upload"):
            EdgeSettings.from_env(bad)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SPLITCLIP_UPLOAD_BATCH": "0"}, "upload_batch must be in 1..4096, got 0"),
        ({"SPLITCLIP_UPLOAD_BATCH": "4097"}, "upload_batch must be in 1..4096, got 4097"),  # the cloud's cap
        ({"SPLITCLIP_JOURNAL_MAX_ENTRIES": "0"}, "journal_max_entries must be >= 1, got 0"),
        (
            {"SPLITCLIP_INDEX": "1", "SPLITCLIP_NODE_ID": "n" * 301},
            "index is on: node_id must be at most 300 characters without NUL, got 301 characters",
        ),
    ],
)
def test_upload_limits_are_the_clouds(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as e:
        EdgeSettings.from_env(env)
    assert str(e.value) == message and "\n" not in message
    assert EdgeSettings.from_env({"SPLITCLIP_UPLOAD_BATCH": "4096"}).upload_batch == 4096
    assert EdgeSettings.from_env({"SPLITCLIP_NODE_ID": "n" * 301}).node_id == "n" * 301  # index off: fine


def test_the_journal_and_the_device_profiles_share_one_cache_dir(tmp_path: Path, monkeypatch) -> None:
    from edge_node import profile
    from edge_node.settings import cache_root

    monkeypatch.setenv("SPLITCLIP_CACHE_DIR", str(tmp_path / "env"))
    s = EdgeSettings(node_id="cam-1")  # built without from_env: the variable is read at call time
    assert s.journal_path("b").parent == tmp_path / "env" / "journal"
    assert profile.cache_file(None, "b", "d").parent == tmp_path / "env" / "profiles"
    assert cache_root(tmp_path) == tmp_path  # a given dir wins
    monkeypatch.delenv("SPLITCLIP_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "splitclip"


def test_the_planner_is_the_default_unless_a_cut_or_a_codec_is_asked_for() -> None:
    env = {"SPLITCLIP_CLOUD": "cloud:9000"}
    assert EdgeSettings.from_env(env).auto  # nothing asked for: the planner chooses
    assert EdgeSettings.from_env(env, cut="auto").auto
    assert not EdgeSettings.from_env({}).auto  # no cloud: local, whatever the plan
    fixed = [
        EdgeSettings.from_env(env, codec="fp16"),  # a codec alone: cut L // 2 with it
        EdgeSettings.from_env({**env, "SPLITCLIP_CODEC": "fp16"}),
        EdgeSettings.from_env(env, cut=2),
        EdgeSettings.from_env({**env, "SPLITCLIP_CUT": "2"}),
    ]
    assert [(s.plan, s.auto) for s in fixed] == [("fixed", False)] * 4
    assert fixed[0].cut is None and fixed[2].cut == 2
    assert EdgeSettings.from_env({**env, "SPLITCLIP_CUT": "auto"}, codec="fp16").auto  # auto asked for wins
