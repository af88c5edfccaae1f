from __future__ import annotations

import pytest

from agent import names


@pytest.mark.parametrize("ok", ["main", "feature/x", "v1.2.3", "release-2024", "a/b/c"])
def test_good_refs(ok: str) -> None:
    assert names.ref_format_problem(ok) is None


@pytest.mark.parametrize("bad", [
    "", "-x", "--upload-pack=touch /tmp/pwned", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*",
    "a[", "a\\b", "/a", "a/", "a//b", "a.", ".a", "a/.b", "a.lock", "a/b.lock", "@", "a@{1}",
    "a\x00b", "a\x7fb", "a\nb",
])
def test_bad_refs(bad: str) -> None:
    assert names.ref_format_problem(bad) is not None


@pytest.mark.parametrize(("name", "ok"), [
    ("hello", True), ("rsync-publish", True), ("a.b_c-9", True), ("x" * 64, True),
    ("x" * 65, False), ("a/b", False), ("..", False), ("a..b", False), ("-a", False),
    (".a", False), ("a b", False), ("a;rm", False), ("$(x)", False), ("", False),
])
def test_names(name: str, ok: bool) -> None:
    assert names.is_name(name) is ok


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("2h", 7200), ("", None),
    ("1x", None), ("m", None), ("0", 0),
])
def test_durations(text: str, seconds: int | None) -> None:
    assert names.parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("512", 512), ("64K", 65536), ("100MiB", 100 << 20), ("1G", 1 << 30), ("2gib", 2 << 30),
    ("1.5G", None), ("lots", None),
])
def test_sizes(text: str, size: int | None) -> None:
    assert names.parse_size(text) == size


@pytest.mark.parametrize(("ref", "ok"), [
    ("efci/base:bookworm", True), ("alpine", True), ("registry:5000/a/b:1.0", True),
    ("-rm", False), ("UPPER", False), ("a b", False), ("a;b", False), ("a:", False),
])
def test_image_refs(ref: str, ok: bool) -> None:
    assert bool(names.IMAGE_REF.fullmatch(ref)) is ok
