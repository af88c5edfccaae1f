from __future__ import annotations

from pathlib import Path

import pytest

from agent.host.btrfs import parse_usage
from agent.host.mounts import mount_of, mounted_under, overlay_options

MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 22 0:50 / /var/lib/efforting-ci/mounts/7/lib rw - overlay overlay rw,lowerdir=/a
91 22 0:51 / /var/lib/efforting-ci/mounts/7/with\\040space rw - overlay overlay rw
92 90 0:52 / /var/lib/efforting-ci/mounts/7/lib/deeper rw - tmpfs tmpfs rw
93 22 0:53 / /var/lib/efforting-ci/mountsX rw - tmpfs tmpfs rw
94 22 0:54 / /srv/caches rw shared:7 - btrfs /dev/loop3 rw,space_cache=v2
95 22 0:54 / /srv/caches rw shared:8 master:7 - btrfs /dev/loop4 rw
"""


def test_mounted_under_is_deepest_first_and_unescapes() -> None:
    root = Path("/var/lib/efforting-ci/mounts")
    assert mounted_under(root, MOUNTINFO) == [
        root / "7/lib/deeper", root / "7/lib", root / "7/with space"]


def test_overlay_options() -> None:
    assert overlay_options([Path("/l")], Path("/u"), Path("/w")) == \
        "lowerdir=/l,upperdir=/u,workdir=/w"
    assert overlay_options([Path("/b"), Path("/a")], Path("/u"), Path("/w")) == \
        "lowerdir=/b:/a,upperdir=/u,workdir=/w"
    for bad in ("/a,b", "/a:b", "/a\\b"):
        with pytest.raises(ValueError, match="cannot be an overlay layer"):
            overlay_options([Path(bad)], Path("/u"), Path("/w"))


def test_too_many_or_too_long_lower_layers_are_refused_before_mount() -> None:
    long = [Path("/var/lib/docker/volumes/efci-0123abcd-1234-mut-0-s9/_data/upper")] * 70
    with pytest.raises(ValueError, match="bytes of mount options"):
        overlay_options(long, Path("/u"), Path("/w"))
    with pytest.raises(ValueError, match="at most 500 layers"):
        overlay_options([Path("/l")] * 501, Path("/u"), Path("/w"))


def test_top_mount_is_the_last_one_at_a_point() -> None:
    from agent.host.mounts import top_mount

    table = ("22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
             "52 22 254:0 /srv/site /srv/site rw,relatime - ext4 /dev/vda rw\n"
             "53 52 254:0 /srv/site /srv/site rw,nosuid,nodev,relatime - ext4 /dev/vda rw\n")
    top = top_mount(Path("/srv/site"), table)
    assert top is not None and {"nosuid", "nodev"} <= top.options
    assert top_mount(Path("/srv"), table) is None


def test_the_pids_cgroup_is_found_under_both_hierarchies(tmp_path: Path) -> None:
    from agent.host.cgroups import limit_reached, pids_events

    v1 = tmp_path / "v1"
    (v1 / "docker/abc").mkdir(parents=True)
    (v1 / "docker/abc/pids.events").write_text("max 17\n")
    table = (f"39 31 0:36 / {v1} rw,relatime - cgroup cgroup rw,pids\n"
             f"41 31 0:38 / {tmp_path / 'v2'} rw,relatime - cgroup2 cgroup2 rw\n")
    found = pids_events("abc", table)
    assert found == v1 / "docker/abc/pids.events" and limit_reached(found) == 17
    assert pids_events("other", table) is None
    v2 = tmp_path / "v2"
    (v2 / "system.slice/docker-abc.scope").mkdir(parents=True)
    (v2 / "system.slice/docker-abc.scope/pids.events").write_text("max 0\n")
    only_v2 = f"41 31 0:38 / {v2} rw,relatime - cgroup2 cgroup2 rw\n"
    assert limit_reached(pids_events("abc", only_v2)) == 0  # type: ignore[arg-type]


def test_mount_of_is_the_deepest_top_mount_above_a_path() -> None:
    assert mount_of(Path("/srv/caches/alice/cargo"), MOUNTINFO).source == "/dev/loop4"
    root = mount_of(Path("/var/lib/docker"), MOUNTINFO)
    assert (root.fstype, root.source, root.point) == ("ext4", "/dev/vda", Path("/"))
    assert mount_of(Path("/var/lib/efforting-ci/mountsX/a"), MOUNTINFO).fstype == "tmpfs"


def test_qgroup_table_and_its_inconsistency_warning() -> None:
    table = """\
Qgroupid    Referenced    Exclusive  Max referenced  Max exclusive   Path
--------    ----------    ---------  --------------  -------------   ----
0/5              16384        16384            none           none   <toplevel>
0/256         10469376     10469376        10485760           none   <stale>
0/257            16384        16384         5242880           none   alice/cargo
1/3              16384        16384         5242880           none   <1 member qgroup>
"""
    usages = parse_usage(table, "")
    assert usages.by_group["0/257"].referenced == 16384
    assert usages.by_group["1/3"].limit == 5242880
    assert usages.by_group["0/5"].limit is None and not usages.inconsistent
    assert parse_usage(table, "WARNING: qgroup data inconsistent, rescan recommended\n"
                       ).inconsistent
