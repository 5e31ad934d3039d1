"""splitclip.settings: one set of parsing rules for every `SPLITCLIP_*` setting, edge and cloud alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from splitclip import settings
from splitclip.errors import SplitclipError
from splitclip.settings import SettingsError


@dataclass(frozen=True)
class Demo:
    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    where: Path | None = None
    name: str = "x"
    limit: int | None = None


def test_strings_parse_by_type() -> None:
    env = {
        "SPLITCLIP_COUNT": "42",
        "SPLITCLIP_RATIO": "2",
        "SPLITCLIP_ENABLED": "Yes",
        "SPLITCLIP_WHERE": "/etc/ca.pem",
        "SPLITCLIP_NAME": "cam 7",
        "SPLITCLIP_LIMIT": "-3",
    }
    values = settings.load(Demo, env, kind="demo")
    assert values == {"count": 42, "ratio": 2.0, "enabled": True, "where": Path("/etc/ca.pem"),
                      "name": "cam 7", "limit": -3}  # fmt: skip
    assert isinstance(values["ratio"], float)


@pytest.mark.parametrize(("raw", "want"), [(s, True) for s in ("1", "true", "TRUE", "yes", " Yes ")]
                         + [(s, False) for s in ("0", "false", "False", "no", "NO")])  # fmt: skip
def test_bools(raw: str, want: bool) -> None:
    assert settings.load(Demo, {"SPLITCLIP_ENABLED": raw}, kind="demo") == {"enabled": want}
    assert settings.load(Demo, {}, {"enabled": raw}, kind="demo") == {"enabled": want}


def test_empty_variables_are_unset_and_overrides_win_unless_none() -> None:
    env = {"SPLITCLIP_COUNT": "", "SPLITCLIP_RATIO": "0.25", "SPLITCLIP_NAME": "env"}
    assert settings.load(Demo, env, {"name": "flag", "ratio": None, "count": 3}, kind="demo") == {
        "count": 3, "ratio": 0.25, "name": "flag",
    }  # fmt: skip
    # Python values from code or a config: the right type passes, a path is a str field's string
    values = settings.load(Demo, {}, {"count": 7, "ratio": 1, "where": "/x", "name": Path("/b")}, kind="demo")
    assert values == {"count": 7, "ratio": 1.0, "where": Path("/x"), "name": "/b"}


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        ("SPLITCLIP_COUNT", "4.5", "int"),
        ("SPLITCLIP_COUNT", "four", "int"),
        ("SPLITCLIP_LIMIT", "none", "int"),
        ("SPLITCLIP_RATIO", "fast", "float"),
        ("SPLITCLIP_ENABLED", "on", "bool (1/0/true/false/yes/no)"),
        ("SPLITCLIP_ENABLED", "2", "bool (1/0/true/false/yes/no)"),
        ("SPLITCLIP_WHERE", "  ", "path"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it_its_value_and_the_type(
    var: str, raw: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as e:
        settings.load(Demo, {var: raw}, kind="demo")
    assert str(e.value).startswith(f"{var}={raw!r} is not a valid {expected}")


@pytest.mark.parametrize(
    ("name", "value"),
    [("count", True), ("count", 4.5), ("count", "x"), ("ratio", False), ("enabled", 1), ("name", 3), ("where", 3)],
)  # fmt: skip
def test_a_bad_override_names_the_setting_and_its_value(name: str, value: object) -> None:
    with pytest.raises(SettingsError, match=f"^demo setting {name}={value!r} is not a valid "):
        settings.load(Demo, {}, {name: value}, kind="demo")


def test_messages_stay_on_one_line() -> None:
    with pytest.raises(SettingsError) as e:
        settings.load(Demo, {"SPLITCLIP_COUNT": "1\n2" + "9" * 200}, kind="demo")
    assert "\n" not in str(e.value) and len(str(e.value)) < 160


def test_unknown_overrides_are_rejected_unknown_variables_ignored() -> None:
    with pytest.raises(SettingsError, match=r"unknown demo setting 'cuont'; known: count, enabled, "):
        settings.load(Demo, {}, {"cuont": 3}, kind="demo")
    # the SPLITCLIP_ namespace is shared by edge, cloud and runtime: another part's variable is no error
    other = {"SPLITCLIP_ORT_THREADS": "2", "SPLITCLIP_REDIS_URL": "redis://r"}
    assert settings.load(Demo, other, kind="demo") == {}


def test_settings_error_is_a_user_error_and_a_value_error() -> None:
    assert issubclass(SettingsError, SplitclipError) and issubclass(SettingsError, ValueError)


def test_a_field_of_another_type_is_a_programming_error() -> None:
    @dataclass
    class Bad:
        items: list[str]

    with pytest.raises(TypeError, match="Bad.items"):
        settings.field_types(Bad)


# -- both settings classes follow these rules ------------------------------------------------------


def _edge(env: dict[str, str], **overrides: object):
    from edge_node.settings import EdgeSettings

    return EdgeSettings.from_env(env, **overrides)


def _cloud(env: dict[str, str], **args: object):
    from cloud_service.settings import CloudSettings

    return CloudSettings.load(args, env)


@pytest.mark.parametrize(("load", "int_field"), [(_edge, "window"), (_cloud, "max_batch_size")])
def test_edge_and_cloud_parse_alike(load, int_field: str) -> None:
    var = settings.env_name(int_field)
    assert getattr(load({var: "6"}), int_field) == 6
    for raw in ("6.5", "six"):
        with pytest.raises(SettingsError, match=f"^{var}={raw!r} is not a valid int$"):
            load({var: raw})
    with pytest.raises(SettingsError, match=f"setting {int_field}=6.5 is not a valid int$"):
        load({}, **{int_field: 6.5})  # no silent truncation to 6
    with pytest.raises(SettingsError, match="unknown .* setting 'nope'"):
        load({}, nope=1)
    with pytest.raises(SettingsError, match=f"{int_field} must be >= 1"):
        load({var: "0"})


def test_cloud_settings_errors_are_the_shared_type() -> None:
    from cloud_service import settings as cloud_settings
    from edge_node import settings as edge_settings

    assert cloud_settings.SettingsError is SettingsError is edge_settings.SettingsError
