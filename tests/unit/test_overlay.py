from __future__ import annotations

from pathlib import Path

import pytest

from agent.host.overlay import mounted_under, overlay_options

MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 22 0:50 / /var/lib/efforting-ci/mounts/7/lib rw - overlay overlay rw,lowerdir=/a
91 22 0:51 / /var/lib/efforting-ci/mounts/7/with\\040space rw - overlay overlay rw
92 90 0:52 / /var/lib/efforting-ci/mounts/7/lib/deeper rw - tmpfs tmpfs rw
93 22 0:53 / /var/lib/efforting-ci/mountsX rw - tmpfs tmpfs rw
"""


def test_mounted_under_is_deepest_first_and_unescapes() -> None:
    root = Path("/var/lib/efforting-ci/mounts")
    assert mounted_under(root, MOUNTINFO) == [
        root / "7/lib/deeper", root / "7/lib", root / "7/with space"]


def test_overlay_options() -> None:
    assert overlay_options(Path("/l"), Path("/u"), Path("/w")) == \
        "lowerdir=/l,upperdir=/u,workdir=/w"
    for bad in ("/a,b", "/a:b", "/a\\b"):
        with pytest.raises(ValueError, match="cannot be an overlay layer"):
            overlay_options(Path(bad), Path("/u"), Path("/w"))
