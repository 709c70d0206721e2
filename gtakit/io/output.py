"""Output folders that appear whole or not at all, and never take a user's files with them.

Every command that writes a folder (convert, the finetune export) goes through `OutputFolder`:

* checks before any work: OUT is not a file, does not hold a protected path (the source model, the run's
  checkpoints), is empty unless forced, and its parent is writable;
* the content is staged in a temporary folder beside OUT and renamed onto it at the end (atomic on one file
  system). Where OUT itself cannot be renamed (a mount point, the working directory or one of its parents, a
  folder whose parent is read-only) the staging folder lives inside OUT and its entries are moved up at the end;
* a symlinked OUT stays a link: its target is what gets written;
* folders and files follow the umask like any file the user creates (no 0700 `mkdtemp` folders, no 0600
  safetensors files: `follow_umask`);
* a failure, Ctrl-C or SIGTERM removes the staging folder; what SIGKILL leaves behind carries a marker naming
  the host and process, and the next run writing the same OUT removes it (or refuses while that process lives).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import socket
from pathlib import Path
from typing import Callable, Iterator, Sequence

from gtakit.errors import GtakitError, Terminated

STAGING_MARK = ".gtakit-partial"  # inside every staging folder: "host pid", proof that gtakit made it
_SIBLING_INFIX = ".tmp-"  # .OUT.tmp-... beside OUT
_INSIDE_PREFIX = ".gtakit-tmp-"  # OUT/.gtakit-tmp-... when OUT cannot be renamed


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (setting it, even briefly, would race
    with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give every file under `root` the mode a plain open() would (0666 & ~umask): safetensors' `save_file`
    (also behind transformers', peft's and accelerate's savers) creates 0600 files, unreadable to a group that the
    umask lets in."""
    mode = 0o666 & ~current_umask()
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                path.chmod(mode)


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def model_folder_of(path: Path) -> Path | None:
    """The model folder (config.json beside weights) that `path` lies inside, or None: nothing is written there."""
    for folder in path.parents:
        if (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
            return folder
    return None


def check_output_file(out: str | Path | None, protect: Sequence[tuple[str | Path | None, str]] = (),
                      option: str = "--output") -> None:
    """Everything that can be refused about an output FILE before any work (the same rules as `OutputFolder`):
    not over an input, not inside a model folder, not onto a folder, not into a missing or unwritable folder."""
    if out is None:
        return
    requested = Path(out).expanduser()
    path = requested.resolve()
    for given, what in protect:
        if given is None:
            continue
        protected = Path(given).expanduser()
        if not protected.exists():
            continue
        protected = protected.resolve()
        if _is_within(path, protected) or path == protected:
            kind = "is" if path == protected else "is inside"
            raise GtakitError(f"{option} {requested} {kind} {what} {given}; writing there would replace it: "
                              f"choose another {option} file")
    model = model_folder_of(path)
    if model is not None:
        raise GtakitError(f"{option} {requested} is inside the model folder {model}; writing there could break the "
                          f"model: choose a {option} file outside it")
    if path.is_dir():
        raise GtakitError(f"{option} {requested} is a folder; give a file name, e.g. {requested / 'results.json'}")
    if not path.parent.is_dir():
        raise GtakitError(f"{option} {requested}: the folder {requested.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GtakitError(f"cannot write {option} {requested} (permission denied); choose another {option} file")


def write_output_file(out: str | Path, text: str) -> None:
    """Write a checked output file whole or not at all: a hidden partial file beside it, renamed onto it."""
    path = Path(out).expanduser()
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        partial.write_text(text)
        partial.replace(path)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        message = disk_error_message(err, path) if isinstance(err, OSError) else None
        if message:
            raise GtakitError(message.replace("-o", "--output")) from None
        raise


class OutputFolder:
    """`with OutputFolder(out, force).staging() as tmp:` write into `tmp`; on success it becomes `out`."""

    def __init__(
        self,
        out: str | Path,
        force: bool,
        protect: Sequence[tuple[str | Path, str]] = (),
        force_hint: str = "pass --force to overwrite it",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.requested = Path(out).expanduser()
        self.path = self.requested.resolve()  # a symlink's target: the link itself stays
        self.force = force
        self.protect = [(Path(p).expanduser().resolve(), what) for p, what in protect]
        self.force_hint = force_hint
        self.log = log or (lambda message: None)

    # ----------------------------------------------------------------------------------------- checks

    def check(self) -> None:
        """Everything that can be refused before any work is done; raises GtakitError with the fix."""
        out = self.requested
        for protected, what in self.protect:
            if _is_within(protected, self.path):
                raise GtakitError(
                    f"output folder {out} holds {what} {protected}; writing there would delete it: choose another -o"
                )
        if self.path.exists() and not self.path.is_dir():
            raise GtakitError(f"output {out} exists and is not a folder; choose a folder path")
        model = model_folder_of(self.path)
        if model is not None:
            raise GtakitError(f"output folder {out} is inside the model folder {model}; writing there could break "
                              "the model: choose another -o outside it")
        if self.path.is_dir() and self._user_entries() and not self.force:
            raise GtakitError(f"output folder {out} is not empty; {self.force_hint}")
        where = self.path if self.in_place else _nearest_existing(self.path.parent)
        if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
            raise GtakitError(f"cannot write to {where} (permission denied or not a folder); choose another -o")
        self._clear_stale()

    @property
    def in_place(self) -> bool:
        """True when OUT exists but cannot be replaced by a rename, so staging happens inside it."""
        if not self.path.is_dir():
            return False
        cwd = Path.cwd().resolve()
        return (
            os.path.ismount(self.path)
            or _is_within(cwd, self.path)
            or not os.access(self.path.parent, os.W_OK | os.X_OK)
        )

    def _user_entries(self) -> list[Path]:
        return [p for p in self.path.iterdir() if not (p.name.startswith(_INSIDE_PREFIX) and self._marked(p))]

    # ----------------------------------------------------------------------------------------- staging

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        self.check()
        tmp = self._make_staging()
        try:
            with terminate_as_interrupt():
                yield tmp
                (tmp / STAGING_MARK).unlink()
                follow_umask(tmp)
                self._commit(tmp)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            message = disk_error_message(err, self.requested) if isinstance(err, OSError) else None
            if message:
                raise GtakitError(message) from None
            raise

    def _make_staging(self) -> Path:
        parent = self.path if self.in_place else self.path.parent
        prefix = _INSIDE_PREFIX if self.in_place else f".{self.path.name}{_SIBLING_INFIX}"
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # mode 0777 & ~umask, unlike tempfile.mkdtemp's 0700
        (tmp / STAGING_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return tmp

    def _commit(self, tmp: Path) -> None:
        out = self.path
        if tmp.parent == out:  # staged inside OUT: clear the old entries, then move the new ones up
            for entry in self._user_entries():
                if entry != tmp:
                    _remove(entry)
            for entry in tmp.iterdir():
                entry.rename(out / entry.name)
            tmp.rmdir()
        elif out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)

    # ----------------------------------------------------------------------------------------- stale runs

    def _marked(self, folder: Path) -> tuple[str, int] | None:
        try:
            host, pid = (folder / STAGING_MARK).read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def _stale_candidates(self) -> list[Path]:
        found = []
        if self.path.parent.is_dir():
            found += self.path.parent.glob(f".{self.path.name}{_SIBLING_INFIX}*")
        if self.path.is_dir():
            found += self.path.glob(f"{_INSIDE_PREFIX}*")
        return [p for p in found if p.is_dir()]

    def _clear_stale(self) -> None:
        """Remove staging folders that a killed earlier run left for this OUT; refuse while one is still live."""
        host = socket.gethostname()
        for folder in self._stale_candidates():
            mark = self._marked(folder)
            if mark is None:
                self.log(f"note: {folder} looks like the leftover of an interrupted earlier run; remove it if so")
            elif mark[0] != host:
                self.log(f"note: {folder} was left by process {mark[1]} on {mark[0]}; remove it if that run is over")
            elif _pid_alive(mark[1]) and mark[1] != os.getpid():
                raise GtakitError(f"another gtakit run (pid {mark[1]}) is writing {self.requested}; wait for it to "
                                  "finish or stop it")
            else:
                shutil.rmtree(folder, ignore_errors=True)
                self.log(f"removed {folder}, left by an interrupted earlier run (pid {mark[1]})")


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP (timeout, docker stop, Slurm, a closed terminal) into an exception while inside."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def disk_error_message(err: OSError, where: Path) -> str | None:
    """A one-line message for the write failures a user can fix (full disk, read-only, permissions)."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device of {where}; free space or choose another -o"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write to {where} ({os.strerror(err.errno)}); choose another -o"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {where}; free space or choose another -o"
    return None
