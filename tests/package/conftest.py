"""The Debian package, tested as an administrator would use it: built from a
clean copy of the tree, checked by lintian, installed with apt-get (so it
runs on Debian's python3 packages), its service command run as the efci
user with the unit's capabilities, driven by a member of efci-admin, purged.

These tests change the machine (they install a package, create users), so
they run only when asked: scripts/test sets EFCI_PACKAGE_TESTS=1 on CI's VM.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EFCI_PACKAGE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="installs a package: set EFCI_PACKAGE_TESTS=1 (scripts/test "
                                   "does) on a machine you can change")
    for item in items:
        if "tests/package/" in str(item.fspath):
            item.add_marker(skip)
