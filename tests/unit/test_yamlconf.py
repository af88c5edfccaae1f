"""The strict YAML layer: every refusal names file, line and field."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.yamlconf import load_bytes


def node(text: str):
    return load_bytes(text.encode(), "f.yml")


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    root = node("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError) as e:
        root.mapping(optional={"a", "b"})
    assert e.value.line == 3 and e.value.field == "a"
    assert "duplicate key (first at line 1)" in e.value.message


def test_alias_bomb_is_refused_before_expansion() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    with pytest.raises(ConfigError) as e:
        node(bomb)
    assert "anchors and aliases" in e.value.message and e.value.line == 1


def test_malformed_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError) as e:
        node("a: 1\nb: [unclosed\nc: 2\n")
    assert e.value.file == "f.yml" and e.value.line >= 2 and "YAML syntax" in e.value.message


@pytest.mark.parametrize(("text", "shown"), [
    ("v: no", "a boolean"), ("v: on", "a boolean"), ("v: 0755", "a number"),
    ("v: 1.5", "a number"), ("v:", "empty"), ("v: [a]", "a list"),
])
def test_yaml11_surprises_are_refused_where_a_string_is_meant(text: str, shown: str) -> None:
    value = node(text).mapping(optional={"v"})["v"]
    with pytest.raises(ConfigError) as e:
        value.string()
    assert shown in e.value.message and e.value.field == "v"
    if shown in ("a boolean", "a number") and text != "v: 1.5":
        assert "quotes" in e.value.message


def test_quoted_scalars_stay_strings() -> None:
    m = node('v: "no"\nw: "0755"\n').mapping(optional={"v", "w"})
    assert m["v"].string() == "no" and m["w"].string() == "0755"


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y"])
def test_booleans_must_be_true_or_false(word: str) -> None:
    value = node(f"v: {word}").mapping(optional={"v"})["v"]
    with pytest.raises(ConfigError, match="true or false"):
        value.boolean()


def test_unknown_and_missing_keys() -> None:
    root = node("image: x\nimgae: y\n")
    with pytest.raises(ConfigError) as e:
        root.mapping(required={"image"}, optional={"command"})
    assert e.value.line == 2 and e.value.field == "imgae" and "unknown key" in e.value.message
    with pytest.raises(ConfigError, match="missing required key image"):
        node("command: x").mapping(required={"image"}, optional={"command"})


def test_nested_field_paths() -> None:
    root = node("tasks:\n  t:\n    env: [1]\n")
    env = root.mapping(optional={"tasks"})["tasks"].mapping(free=True)["t"] \
        .mapping(optional={"env"})["env"]
    with pytest.raises(ConfigError) as e:
        env.mapping(free=True)
    assert e.value.field == "tasks.t.env" and e.value.line == 3


def test_non_utf8_and_nul() -> None:
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_bytes(b"a: \xff\n", "f.yml")
    value = node('v: "a\\0b"').mapping(optional={"v"})["v"]
    with pytest.raises(ConfigError, match="NUL"):
        value.string()


def test_empty_document_is_none() -> None:
    assert node("") is None and node("# only a comment\n") is None
