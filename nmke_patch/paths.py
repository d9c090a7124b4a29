"""Where nmke-patch keeps its caches: ``$NMKE_PATCH_HOME`` or ``~/.cache/nmke-patch``."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)


def home() -> Path:
    """Root of nmke-patch's cache (converted default model, key statistics, lifelong benchmark state)."""
    env = os.environ.get("NMKE_PATCH_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "nmke-patch"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def sole_writer(target: Path, command: str) -> Iterator[None]:
    """Hold, while the body runs, the lock on writing ``target`` that long writers (``create``, with its
    checkpoint beside the output) take: a second ``command`` on the same output is refused at once instead of
    racing the first to the checkpoint and the output. The lock file lives in the cache (``locks/``, named by
    the output's absolute path), not beside the output; the operating system drops the lock of a process that
    dies."""
    spelled = target.absolute().parent.resolve() / target.name  # ./a, a and /abs/a are one output
    folder = home() / "locks"
    folder.mkdir(exist_ok=True)
    lock = FileLock(folder / f"{hashlib.sha256(str(spelled).encode()).hexdigest()[:32]}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FileExistsError(
            f"another {command} is writing {target} right now: wait for it to finish, or choose another output"
        ) from None
    try:
        yield
    finally:
        lock.release()


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_permissions(files: list[Path]) -> None:
    """Give ``files`` the permissions a plainly created file gets under the umask: writers that make 0600
    files (safetensors' ``save_file``, which ``save_pretrained`` uses) would leave a saved model unreadable
    to the other users of a shared machine."""
    mode = 0o666 & ~current_umask()
    for file in files:
        os.chmod(file, mode)


def check_parents(target: Path, *, probe: bool = True) -> None:
    """Refuse, before any work, a path to write to whose nearest existing parent is a file or a broken
    link, or (``probe``: the target is created beside its siblings, by a rename) one in which nothing can
    be created; the folders would fail only at the end, with a bare errno."""
    for parent in target.absolute().parents:
        if parent.is_symlink() and not parent.exists():
            raise FileExistsError(f"{target}: {parent} is a broken link")
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{target}: {parent} is a file, not a directory")
            if probe:
                check_writable(target, parent)
            return


_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def check_writable(target: Path, folder: Path) -> None:
    """Refuse, with one readable line, a ``folder`` nothing can be created in (permissions, a read-only
    or virtual file system, a full disk): found by trying, since ``os.access`` does not know every file
    system. ``PermissionError`` where it is not allowed, ``OSError`` otherwise."""
    try:
        made = Path(tempfile.mkdtemp(prefix=".nmke-probe-", dir=folder))
    except OSError as exc:
        message = (
            f"{target}: cannot write in {folder} ({exc.strerror or type(exc).__name__}); choose another place"
        )
        raise (PermissionError if exc.errno in _NOT_ALLOWED else OSError)(message) from exc
    made.rmdir()


def new_folder_has_content(target: Path, hint: str) -> bool:
    """For a folder to be written whole (a pack built or pulled into it): refuse a parent that is a file
    (:func:`check_parents`) and a ``target`` that is a file or a link, saying ``hint``; whether ``target``
    exists with something in it (the caller decides whether that may be replaced)."""
    check_parents(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target} is a file or a link; {hint}")
    try:
        here: Path | None = Path.cwd().resolve()
    except FileNotFoundError:  # the folder this runs in was deleted: it cannot be the target
        here = None
    if (
        here is not None
        and target.exists()
        and (here == target.resolve() or target.resolve() in here.parents)
    ):
        raise FileExistsError(
            f"{target} is the folder this runs in (or holds it), which a new folder replaces whole; {hint} "
            "such as ./pack"
        )
    return target.exists() and any(target.iterdir())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:32] or "host"


def aside_name(stem: str) -> str:
    """``STEM-HOST-PID-XXXXXXXX``: the name of a file or folder a write keeps aside until it is done, saying
    which process made it, so that what a killed process left can be told from what a running one is using
    (:func:`remove_leftovers`)."""
    return f"{stem}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or cannot tell
        return True
    return True


def remove_leftovers(folder: Path, stem: str, *, suffix: str = "") -> None:
    """Delete what writes killed on this machine left in ``folder`` under :func:`aside_name` names of
    ``stem`` (+ ``suffix``): those whose process no longer runs. Another machine's (a shared file system)
    and a running process's are left alone; so is everything on a system without POSIX process checks."""
    if os.name != "posix":
        return  # os.kill(pid, 0) would not be a question there
    pattern = re.compile(rf"{re.escape(stem)}-{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}{re.escape(suffix)}")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or _running(int(found.group(1))):
            continue
        logger.info("removing %s, left by an interrupted write", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def staging_dir(target: Path) -> Path:
    """A new hidden ``.NAME.tmp-HOST-PID-XXXXXXXX`` directory next to ``target``, with the permissions the
    umask gives (``tempfile.mkdtemp`` makes it 0700, and the directory moved into place would keep that).
    Staging directories that killed writes to ``target`` left are removed first."""
    remove_leftovers(target.parent, f".{target.name}.tmp")
    for _ in range(100):
        path = target.parent / aside_name(f".{target.name}.tmp")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a staging directory next to {target}")


def written_meanwhile(target: Path) -> FileExistsError:
    """The refusal for an output that was new or empty when checked and that something else wrote since."""
    return FileExistsError(
        f"{target} was written by something else while this ran (another process?); it was left as it is"
        " and nothing was written: choose another output, or --overwrite"
    )


def move_into_place(staging: Path, target: Path, *, replace: bool = True) -> None:
    """Rename the finished ``staging`` directory to ``target``. Something already at ``target`` is moved aside
    first and deleted only once the new directory is in place (put back if the rename fails), so an
    interrupted write leaves either the old directory or the new one, never a mix.

    With ``replace=False`` (the caller checked that ``target`` was new or an empty folder) nothing is moved
    aside: a ``target`` that another process filled meanwhile is left as it is and this write is refused
    (``FileExistsError``), in the same atomic rename."""
    if not replace:
        try:
            os.rename(staging, target)  # onto nothing or an empty folder; refused onto anything else
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise written_meanwhile(target) from exc
            raise
        return
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return
    remove_leftovers(target.parent, f".{target.name}.old")  # an earlier replace killed after its swap
    backup = target.with_name(aside_name(f".{target.name}.old"))
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)  # never lose what was there
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()
