"""Image declarations: built once with ``docker build``, tagged by a hash of
the declaration and its build context, reused by every task that names
them, rebuilt only when that hash changes."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
from collections import defaultdict
from pathlib import Path

import trio

from .errors import RunFailed
from .host.engine import Engine
from .logstore import LogWriter
from .model import Image

log = logging.getLogger(__name__)

MAX_CONTEXT_FILES = 20_000


class BuildFailed(RunFailed):
    code = "build_failed"


def _check_paths(image: Image) -> None:
    """The declaration resolved its paths (symlinks included) inside the
    declarations directory; refuse if they lead elsewhere now, or are gone."""
    for path in (image.context, image.dockerfile):
        if path is not None and os.path.realpath(path) != str(path):
            raise BuildFailed(f"image {image.name}: {path} now leads through a symlink; "
                              "it changed since the declarations were read (efci reload)")
    if image.dockerfile is not None and not image.dockerfile.is_file():
        raise BuildFailed(f"image {image.name}: its Dockerfile {image.dockerfile} is gone "
                          f"(declared at {image.source})")
    if not image.context.is_dir():
        raise BuildFailed(f"image {image.name}: its context {image.context} is not a "
                          f"directory (declared at {image.source})")


def image_tag(image: Image) -> str:
    """``efci/image-<name>:<16 hex digits>`` of the Dockerfile and every file
    of the context (path, mode, content), so any change makes a new tag."""
    _check_paths(image)
    digest = hashlib.sha256(f"{image.name}\0".encode())
    if image.inline is not None:
        digest.update(b"inline\0" + image.inline.encode())
    else:
        assert image.dockerfile is not None
        digest.update(b"file\0" + image.dockerfile.read_bytes())
    count = 0
    for root, dirs, files in os.walk(image.context):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            count += 1
            if count > MAX_CONTEXT_FILES:
                raise BuildFailed(f"image {image.name}: its context {image.context} has more "
                                  f"than {MAX_CONTEXT_FILES} files")
            st = path.lstat()
            digest.update(f"{path.relative_to(image.context)}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):  # docker sends a symlink as a symlink
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                try:
                    digest.update(path.read_bytes())
                except OSError as e:
                    raise BuildFailed(f"image {image.name}: cannot read {path} of its "
                                      f"context: {e.strerror}") from None
    return f"efci/image-{image.name.lower()}:{digest.hexdigest()[:16]}"


class Images:
    def __init__(self, engine: Engine, instance: str) -> None:
        self.engine = engine
        self.instance = instance  # labels what it builds: only its own are gc's
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)

    async def exists(self, tag: str) -> bool:
        """Asked of docker only when its record of tags cannot say (every run
        of a declared image asks)."""
        return bool(await self.engine.image_id(tag)) or await self.engine.image_exists(tag)

    async def ensure(self, image: Image, writer: LogWriter, *, force: bool = False) -> str:
        """The image's tag, built first (output in the run's log, stream
        ``image:<name>``) if it is missing or ``force``."""
        tag = await trio.to_thread.run_sync(image_tag, image)
        async with self._locks[image.name]:
            if not force and await self.exists(tag):
                return tag
            stream = writer.stream(f"image:{image.name}")
            writer.message(f"building image {image.name} as {tag}")
            status = await self.engine.build(
                tag, image.context, dockerfile=image.dockerfile, inline=image.inline,
                labels={"image": image.name, "instance": self.instance},
                output=functools.partial(writer.output, stream=stream))
            if status != 0:
                raise BuildFailed(f"image {image.name} failed to build (docker build exit "
                                  f"status {status}); its output is in the log, stream "
                                  f"image:{image.name}")
            log.info("built image %s as %s", image.name, tag)
        return tag
