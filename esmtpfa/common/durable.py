"""Files that survive a crash: the Maildir discipline, in one place.

D. J. Bernstein's "Using maildir format" (and Courier's maildir(5)) give the order that
makes a file durable and whole for every reader: write it under a temporary name, fsync
it, give it its final name without ever replacing another file, then fsync the
directory that now holds the name.  The local Maildir (``relay.maildir``) and the file
spool (``spool.files``) both write this way; a reader never sees a partial file and a
crash never loses one that was acknowledged.
"""

from __future__ import annotations

import errno
import os


def publish(tmp: str, final: str) -> None:
    """Give ``tmp`` the name ``final`` unless ``final`` exists: ``link`` refuses to
    replace (``rename`` would, silently); ``rename`` where the file system has no
    links (then after checking that ``final`` is free)."""
    try:
        os.link(tmp, final)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                               errno.EMLINK):
            raise
        if os.path.exists(final):
            raise FileExistsError(errno.EEXIST, "the file name is taken", final) from error
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def fsync_directory(path: str) -> None:
    """Make the names in ``path`` (a new file's, a removed one's) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is there: cleaning up after a failure must not fail."""
    try:
        os.unlink(path)
    except OSError:
        pass
