"""Per-job workspace: `<root>/<job_id>/{input,work,output,logs}` and its files.

I/O: filesystem (URL inputs are fetched by inputs.py). Directories are 0700. Artifacts are
opened component by component with O_NOFOLLOW below `output/`, so a symlink,
a hard link to a foreign file, a device or a FIFO can never be uploaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import inputs
from .errors import ErrorCode, JobFailure
from .manifest import ArtifactSpec, InputUrl

SUBDIRS = ("input", "work", "output", "logs")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MIB = 1024 * 1024


@dataclass(frozen=True)
class Workspace:
    path: Path

    @property
    def input(self) -> Path:
        return self.path / "input"

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def output(self) -> Path:
        return self.path / "output"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"

    @property
    def exec_log(self) -> Path:
        return self.logs / "exec.log"

    @classmethod
    def create(cls, root: Path, job_id: str, attempt: int) -> Workspace:
        """Make a fresh workspace; an older attempt's directory is moved aside."""
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = root / job_id
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            aside = root / f"{job_id}~a{attempt - 1}-{int(time.time() * 1000)}"
            os.rename(path, aside)
        path.mkdir(mode=0o700)
        for sub in SUBDIRS:
            (path / sub).mkdir(mode=0o700)
        (path / "work" / "tmp").mkdir(mode=0o700)
        return cls(path)

    # -- inputs ---------------------------------------------------------------------

    def write_inline(self, rel: str, text: str) -> None:
        target = self._input_target(rel)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8", "surrogatepass"))

    def _input_target(self, rel: str) -> Path:
        target = self.input / rel
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return target

    async def download(self, client: httpx.AsyncClient, spec: InputUrl, default_max_mb: int) -> int:
        """Fetch a URL input to `input/<path>` under the input policy (inputs.py):
        http(s) on every hop, no link-local/metadata addresses, max_mb, sha256."""
        return await inputs.fetch(
            client,
            spec.url,
            self._input_target(spec.path),
            limit_bytes=(spec.max_mb or default_max_mb) * MIB,
            sha256=spec.sha256,
            label=spec.path,
        )

    def expose_inputs(self, rels: Iterable[str]) -> None:
        """Make each input reachable from work/ by the same relative path (read-only link)."""
        for rel in rels:
            source = self.input / rel
            os.chmod(source, 0o400)
            link = self.work / rel
            link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not link.exists() and not link.is_symlink():
                os.symlink(os.path.relpath(source, link.parent), link)

    # -- artifacts --------------------------------------------------------------------

    def promote_artifacts(self, specs: Iterable[ArtifactSpec]) -> None:
        """Move artifacts written by bare name into work/ over to output/ (no symlinks)."""
        for spec in specs:
            dest = self.output / spec.path
            if dest.exists() or dest.is_symlink():
                continue
            try:
                src_fd = _open_beneath(self.work, spec.path)
            except (OSError, JobFailure):
                continue
            dir_fd, name = src_fd
            try:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:  # not in work/ either: open_artifact reports it missing
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                dest_dir = _open_dir_chain(self.output, os.path.dirname(spec.path))
                try:
                    os.rename(
                        name, os.path.basename(spec.path), src_dir_fd=dir_fd, dst_dir_fd=dest_dir
                    )
                finally:
                    os.close(dest_dir)
            finally:
                os.close(dir_fd)

    def _open_regular(self, rel: str) -> int:
        """fd of `output/<rel>`: a regular, singly linked file reached without symlinks."""
        try:
            dir_fd, name = _open_beneath(self.output, rel)
        except FileNotFoundError:
            raise JobFailure(ErrorCode.OUTPUT, f"artifact {rel} is missing") from None
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            raise JobFailure(ErrorCode.OUTPUT, f"artifact {rel} is missing") from None
        except OSError as exc:  # ELOOP: a symlink
            raise JobFailure(
                ErrorCode.OUTPUT, f"artifact {rel} is not a regular file ({exc.strerror})"
            ) from None
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"artifact {rel} is not a regular file"
        elif st.st_nlink != 1:
            problem = f"artifact {rel} is a hard link"
        if problem:
            os.close(fd)
            raise JobFailure(ErrorCode.OUTPUT, problem)
        return fd

    def open_artifact(self, rel: str, max_bytes: int) -> tuple[int, int, str]:
        """Open `output/<rel>` safely and hash it; returns (fd, size, sha256). Caller closes fd.

        The cap is enforced while reading, so a file growing past it is refused
        without reading it whole first.
        """
        fd = self._open_regular(rel)
        try:
            digest = hashlib.sha256()
            size = 0
            while chunk := os.read(fd, MIB):
                size += len(chunk)
                if size > max_bytes:
                    raise JobFailure(
                        ErrorCode.OUTPUT,
                        f"artifact {rel} exceeds its size cap of {max_bytes} bytes",
                    )
                digest.update(chunk)
            return fd, size, digest.hexdigest()
        except BaseException:
            os.close(fd)
            raise

    def open_recorded(self, rel: str, size: int) -> int:
        """Reopen an artifact collected earlier (crash recovery); its size must not have changed."""
        fd = self._open_regular(rel)
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise JobFailure(ErrorCode.OUTPUT, f"artifact {rel} changed since it was collected")
        return fd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _open_dir_chain(base: Path, rel_dir: str) -> int:
    fd = os.open(base, _DIR_FLAGS)
    for part in [p for p in rel_dir.split("/") if p]:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, FileNotFoundError):
                raise
            raise JobFailure(
                ErrorCode.OUTPUT, f"path component {part!r} is not a plain directory"
            ) from None
        os.close(fd)
        fd = nxt
    return fd


def _open_beneath(base: Path, rel: str) -> tuple[int, str]:
    """(fd of the parent directory, final name), walking without following symlinks."""
    if rel.startswith("/") or ".." in rel.split("/") or "\x00" in rel:
        raise JobFailure(ErrorCode.OUTPUT, f"artifact path {rel!r} escapes the workspace")
    parent, _, name = rel.rpartition("/")
    return _open_dir_chain(base, parent), name
