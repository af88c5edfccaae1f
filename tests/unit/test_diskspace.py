"""What a run's writable layers take, counted as du(1) counts."""

from __future__ import annotations

import os
from pathlib import Path

from agent import diskspace


def test_space_taken_counts_blocks_once_and_follows_nothing(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    (layer / "a" / "b").mkdir(parents=True)
    (layer / "a" / "b" / "data").write_bytes(os.urandom(1 << 20))
    os.link(layer / "a" / "b" / "data", layer / "again")  # a hard link: counted once
    with open(layer / "sparse", "wb") as f:  # a hole takes nothing
        f.truncate(1 << 30)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(4 << 20))
    (layer / "link").symlink_to(outside)  # not followed
    taken = diskspace.space_taken([layer, tmp_path / "gone"])
    each = [layer / "a", layer / "a" / "b", layer / "a" / "b" / "data", layer / "sparse",
            layer / "link"]
    assert taken == sum(os.lstat(p).st_blocks * 512 for p in each)
    assert (1 << 20) <= taken < (2 << 20)
