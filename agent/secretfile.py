"""A secret in a file: read only if this user alone can read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_own(path: Path) -> bytes:
    """The file's stripped content, if it is a regular file of this user's
    with no access for others (0600); PermissionError says what is wrong,
    OSError if it cannot be opened (a symlink is not followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise PermissionError(f"{path} must be a file of uid {os.geteuid()} with mode 0600, "
                                  f"not mode {stat.S_IMODE(st.st_mode):04o} of uid {st.st_uid}")
        content = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if not content:
        raise PermissionError(f"{path} is empty")
    return content
