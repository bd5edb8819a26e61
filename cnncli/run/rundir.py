"""The run directory: what `cnncli train` writes and every other command reads.

    runs/<name>/
      recipe.yaml       the resolved recipe (after --set overrides)
      data.json         class names, image shape and the normalization statistics of the run
      metrics.jsonl     one JSON object per epoch
      checkpoints/      Orbax checkpoints + index.json (latest, best): see cnncli.run.checkpoint
      summary.json      final results (best epoch, test metrics)
      calibration.json  temperatures fitted by `cnncli eval --temperature`, per checkpoint and weights
      tensorboard/      TensorBoard event files (with tensorboardX installed); steps.csv, epochs.csv: the same as CSV
      plots/            figures
      .lock             held (flock) by the one process that writes the run, removed when it ends

One writer, many readers. The commands that write a run (train, fine-tune, import-weights) hold an
exclusive `flock` on `.lock` from before they load any data until they exit, so a second writer stops
with one line naming the PID that holds it; readers (eval, predict, ...) take no lock. Every file a
reader opens is replaced atomically (written to a temporary name, fsynced, renamed, the directory
fsynced) or only appended to, so a reader sees either the old or the new content, never a torn one.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cnncli.console import to_json
from cnncli.errors import UserError, os_fault

DEFAULT_ROOT = Path("runs")
LOCK = ".lock"
OWN_FILES = ("recipe.yaml", "data.json", "metrics.jsonl", "summary.json", "calibration.json", "steps.csv",
             "epochs.csv", "samples.png")
OWN_DIRS = ("checkpoints", "plots", "tensorboard", "generator")  # generator/ and samples.png: `cnncli gan train`
TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a directory; the rename itself still happened
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text`: a temporary file, fsync, rename, fsync of the directory.

    A reader (or a crash, or a power loss after this returns) sees the old or the new content in full.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class RunDir:
    writes = True  # this process writes the run directory (see FollowerRun)

    def __init__(self, path: Path | str):
        self.path = Path(path)

    recipe = property(lambda self: self.path / "recipe.yaml")
    data = property(lambda self: self.path / "data.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    summary = property(lambda self: self.path / "summary.json")
    plots = property(lambda self: self.path / "plots")
    calibration = property(lambda self: self.path / "calibration.json")
    tensorboard = property(lambda self: self.path / "tensorboard")
    steps_csv = property(lambda self: self.path / "steps.csv")
    epochs_csv = property(lambda self: self.path / "epochs.csv")

    def has_run(self) -> bool:
        """The directory holds a cnncli run (or what is left of one): its recipe and anything it wrote."""
        if not self.path.is_dir():
            return False
        return self.recipe.is_file() and (self.data.is_file() or self.metrics.is_file() or self.checkpoints.is_dir())

    def collisions(self) -> list[str]:
        """The names a run would write that already exist here (in a directory that holds no run)."""
        if not self.path.is_dir():
            return []
        return [name for name in (*OWN_FILES, *OWN_DIRS) if (self.path / name).exists()]

    def check_new(self, replacing: bool, how_to_resume: str) -> None:
        """Refuse to start a new run here unless the directory is new, empty of run files, or (with
        `replacing`, i.e. --overwrite) holds a cnncli run."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file, not a run directory: choose another --run-dir")
        if self.has_run():
            if not replacing:
                raise UserError(f"{self.path} already holds a run: {how_to_resume} to continue it, --overwrite to "
                                "start over, or --run-dir for another directory")
            return
        taken = self.collisions()
        if taken:
            raise UserError(f"{self.path} holds no cnncli run but has {', '.join(taken)}, which a run would "
                            f"{'delete' if replacing else 'replace'}: choose another --run-dir")
        if replacing and self.path.is_dir() and any(p.name != LOCK for p in self.path.iterdir()):
            # --overwrite replaces runs only: a folder of other files is never the target of a deletion.
            raise UserError(f"{self.path} holds no cnncli run, so --overwrite has nothing to replace: choose an "
                            "empty or new --run-dir, or leave out --overwrite")

    def clear(self) -> list[str]:
        """Delete the run's own files (--overwrite); returns the names of the other entries, which stay."""
        for name in OWN_FILES:
            (self.path / name).unlink(missing_ok=True)
            (self.path / (name + TMP_SUFFIX)).unlink(missing_ok=True)
        for name in OWN_DIRS:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
        fsync_dir(self.path)
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row durably; a failed write (disk full) is rolled back, never left half written."""
        line = to_json(row) + "\n"
        with self.metrics.open("a", encoding="utf-8") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise

    def read_metrics(self) -> list[dict[str, Any]]:
        try:
            text = self.metrics.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: ignore it
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric rows after `last_epoch` (written after the checkpoint a resume starts from)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        write_atomic(self.metrics, "".join(to_json(r) + "\n" for r in rows))

    def write_json(self, path: Path, obj: Any) -> None:
        write_atomic(path, to_json(obj, indent=1))

    def write_text(self, path: Path, text: str) -> None:
        write_atomic(path, text)

    def read_json(self, path: Path) -> Any:
        """A JSON file of the run; a missing or damaged one is a UserError naming it."""
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} is missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is damaged (not JSON: {e})") from None
        except OSError as e:
            raise os_fault(e, f"cannot read {path}") or e from None


def numbered_runs(root: Path, name: str) -> list[RunDir]:
    """root/name, root/name-2, root/name-3, ... as far as they exist, in that order."""
    runs, k = [RunDir(root / name)], 2
    while (root / f"{name}-{k}").exists():
        runs.append(RunDir(root / f"{name}-{k}"))
        k += 1
    return runs


def default_run_dir(root: Path, name: str) -> RunDir:
    """root/name, or the first of root/name-2, root/name-3, ... that holds no run when it is taken."""
    runs = numbered_runs(root, name)
    free = next((r for r in runs if not r.has_run()), None)
    return free or RunDir(root / f"{name}-{len(runs) + 1}")


def latest_run_dir(root: Path, name: str) -> RunDir:
    """The newest of root/name, root/name-2, ... that holds a run (what `--resume` without --run-dir means)."""
    held = [r for r in numbered_runs(root, name) if r.has_run()]
    return held[-1] if held else RunDir(root / name)


class FollowerRun(RunDir):
    """A run as the processes other than 0 of a multi-process run see it: they write nothing.

    Process 0 writes the run directory (which the others may not even see). Every process computes
    the same metrics rows, so the followers keep theirs in memory: decisions taken from the history
    (early stopping, plateau lr drops) come out alike on every process.
    """

    writes = False

    def __init__(self, path: Path | str):
        super().__init__(path)
        self._rows: list[dict[str, Any]] = []

    def set_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Start from the rows process 0 read (a resumed run)."""
        self._rows = list(rows)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._rows.append(row)

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def truncate_metrics(self, last_epoch: int) -> None:
        self._rows = [r for r in self._rows if r.get("epoch", 0) <= last_epoch]

    def write_json(self, path: Path, obj: Any) -> None:
        pass

    def write_text(self, path: Path, text: str) -> None:
        pass


class RunLock:
    """The exclusive right to write a run directory, held from before any data is loaded until exit.

    Taking it creates the directory and writes `.lock`, which is also the check that the directory is
    writable (not a file, not below a file, not read-only, not on a full disk). The lock is a `flock`
    on `.lock`, so it dies with its process (kill -9 included): a `.lock` left behind locks nothing.
    """

    def __init__(self, path: Path | str, command: str = ""):
        self.path = Path(path)
        self.command = command or " ".join(["cnncli", *sys.argv[1:2]])
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"{self.path} is a file, not a run directory: choose another --run-dir") from None
        except OSError as e:
            raise os_fault(e, f"cannot create the run directory {self.path}") or e from None
        lock = self.path / LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise os_fault(e, f"cannot write to the run directory {self.path}") or e from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"{self.path} is being written by {holder}: wait for it to finish or stop it "
                                "(two writers would mix their checkpoints); reading it (eval, predict) needs no "
                                "lock") from None
            if _same_file(fd, lock):
                break
            os.close(fd)  # its holder removed the lock file as we opened it: lock the current one
        holder = (f"PID {os.getpid()} on {socket.gethostname()} (`{self.command}`, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode() + b"\n", 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise os_fault(e, f"cannot write to the run directory {self.path}") or e from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # removed while held: a process that opened it retries (_same_file)
            (self.path / LOCK).unlink()
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()  # nothing was written (the command failed early): leave no empty directory
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def resolve(path: Path | str) -> RunDir:
    """A run directory given by the user (for eval & co.); a path that is not one is a user error."""
    run = RunDir(path)
    if not run.path.exists():
        raise UserError(f"{run.path} does not exist: give a run directory written by `cnncli train`")
    return run
