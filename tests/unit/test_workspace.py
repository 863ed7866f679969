"""The per-job workspace on a real filesystem (tmp_path)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from aitbc_miner.errors import ErrorCode, JobFailure
from aitbc_miner.manifest import ArtifactSpec
from aitbc_miner.workspace import SUBDIRS, Workspace

CAP = 1 << 20


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "root", "j-1", 1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def output_failure(ws: Workspace, rel: str, cap: int = CAP) -> JobFailure:
    with pytest.raises(JobFailure) as info:
        fd, _, _ = ws.open_artifact(rel, cap)
        os.close(fd)  # only reached if the test is about to fail
    assert info.value.code is ErrorCode.OUTPUT
    return info.value


# -- create --------------------------------------------------------------------------


def test_create_makes_private_dirs(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "root", "j-1", 1)
    assert ws.path == tmp_path / "root" / "j-1"
    assert sorted(p.name for p in ws.path.iterdir()) == sorted(SUBDIRS)
    for d in (ws.path, ws.input, ws.work, ws.output, ws.logs, ws.tmp):
        assert d.is_dir() and not d.is_symlink()
        assert mode(d) == 0o700, d
    assert ws.tmp == ws.work / "tmp"
    assert ws.exec_log == ws.logs / "exec.log"


def test_create_moves_an_older_attempt_aside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    old = Workspace.create(root, "j-1", 1)
    (old.output / "evidence.txt").write_text("from attempt 1")
    new = Workspace.create(root, "j-1", 2)
    assert new.path == old.path
    assert list(new.output.iterdir()) == []
    asides = [p for p in root.iterdir() if p.name != "j-1"]
    assert len(asides) == 1
    assert asides[0].name.startswith("j-1~a1-")
    assert (asides[0] / "output" / "evidence.txt").read_text() == "from attempt 1"


def test_create_replaces_a_symlink_without_touching_its_target(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    (root / "j-1").symlink_to(elsewhere)
    ws = Workspace.create(root, "j-1", 1)
    assert not ws.path.is_symlink() and ws.output.is_dir()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep"]


# -- open_artifact --------------------------------------------------------------------


def test_open_artifact_regular_file(ws: Workspace) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks
    (ws.output / "out.bin").write_bytes(data)
    fd, size, digest = ws.open_artifact("out.bin", 10 * CAP)
    try:
        assert size == len(data)
        assert digest == hashlib.sha256(data).hexdigest()
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 16) == data[:16]
    finally:
        os.close(fd)


def test_open_artifact_nested_and_empty(ws: Workspace) -> None:
    (ws.output / "a" / "b").mkdir(parents=True)
    (ws.output / "a" / "b" / "empty").write_bytes(b"")
    fd, size, digest = ws.open_artifact("a/b/empty", CAP)
    os.close(fd)
    assert size == 0 and digest == hashlib.sha256(b"").hexdigest()


def test_open_artifact_exactly_at_cap(ws: Workspace) -> None:
    (ws.output / "f").write_bytes(b"x" * 1000)
    fd, size, _ = ws.open_artifact("f", 1000)
    os.close(fd)
    assert size == 1000


def test_missing_artifact(ws: Workspace) -> None:
    assert "missing" in output_failure(ws, "nope.txt").message


def test_missing_artifact_directory(ws: Workspace) -> None:
    assert "missing" in output_failure(ws, "no/such/dir.txt").message


def test_symlink_to_etc_passwd(ws: Workspace) -> None:
    (ws.output / "out.txt").symlink_to("/etc/passwd")
    output_failure(ws, "out.txt")


def test_symlink_to_a_file_inside_output(ws: Workspace) -> None:
    (ws.output / "real.txt").write_text("x")
    (ws.output / "alias.txt").symlink_to(ws.output / "real.txt")
    output_failure(ws, "alias.txt")


def test_dangling_symlink(ws: Workspace) -> None:
    (ws.output / "dangling").symlink_to(ws.output / "nowhere")
    output_failure(ws, "dangling")


def test_symlinked_intermediate_directory(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (ws.output / "sub").symlink_to(outside)
    failure = output_failure(ws, "sub/secret.txt")
    assert "sub" in failure.message


def test_intermediate_component_is_a_file(ws: Workspace) -> None:
    (ws.output / "sub").write_text("x")
    output_failure(ws, "sub/f.txt")


def test_hard_link(ws: Workspace, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("not the job's")
    os.link(foreign, ws.output / "out.txt")
    assert "hard link" in output_failure(ws, "out.txt").message


def test_fifo_does_not_block(ws: Workspace) -> None:
    os.mkfifo(ws.output / "pipe")
    assert "regular file" in output_failure(ws, "pipe").message


def test_directory_is_not_an_artifact(ws: Workspace) -> None:
    (ws.output / "dir").mkdir()
    output_failure(ws, "dir")


def test_over_the_size_cap(ws: Workspace) -> None:
    (ws.output / "big").write_bytes(b"x" * 1001)
    output_failure(ws, "big", cap=1000)


@pytest.mark.parametrize("rel", ["../state.json", "/etc/passwd", "a/../../x", "a\x00b"])
def test_escaping_paths(ws: Workspace, rel: str) -> None:
    assert "escapes" in output_failure(ws, rel).message


def test_open_artifact_does_not_leak_fds(ws: Workspace) -> None:
    (ws.output / "big").write_bytes(b"x" * 2000)
    os.mkfifo(ws.output / "pipe")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for rel in ("big", "pipe", "missing"):
            with pytest.raises(JobFailure):
                ws.open_artifact(rel, 1000)
    assert len(os.listdir("/proc/self/fd")) == before


# -- promote_artifacts ----------------------------------------------------------------


def test_promote_moves_bare_name_from_work(ws: Workspace) -> None:
    (ws.work / "out.txt").write_text("result")
    ws.promote_artifacts([ArtifactSpec(path="out.txt")])
    assert not (ws.work / "out.txt").exists()
    assert (ws.output / "out.txt").read_text() == "result"


def test_promote_nested_path(ws: Workspace) -> None:
    (ws.work / "sub").mkdir()
    (ws.work / "sub" / "out.txt").write_text("nested")
    ws.promote_artifacts([ArtifactSpec(path="sub/out.txt")])
    assert (ws.output / "sub" / "out.txt").read_text() == "nested"
    assert not (ws.work / "sub" / "out.txt").exists()


def test_promote_never_moves_a_symlink(ws: Workspace) -> None:
    (ws.work / "out.txt").symlink_to("/etc/passwd")
    ws.promote_artifacts([ArtifactSpec(path="out.txt")])
    assert (ws.work / "out.txt").is_symlink()
    assert not (ws.output / "out.txt").exists() and not (ws.output / "out.txt").is_symlink()


def test_promote_does_not_walk_a_symlinked_dir_in_work(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "out.txt").write_text("secret")
    (ws.work / "sub").symlink_to(outside)
    ws.promote_artifacts([ArtifactSpec(path="sub/out.txt")])
    assert (outside / "out.txt").read_text() == "secret"
    assert not (ws.output / "sub").exists()


def test_promote_leaves_output_alone_when_it_has_the_file(ws: Workspace) -> None:
    (ws.output / "out.txt").write_text("from output")
    (ws.work / "out.txt").write_text("from work")
    ws.promote_artifacts([ArtifactSpec(path="out.txt")])
    assert (ws.output / "out.txt").read_text() == "from output"
    assert (ws.work / "out.txt").read_text() == "from work"


def test_promote_leaves_a_symlink_in_output_alone(ws: Workspace) -> None:
    (ws.output / "out.txt").symlink_to("/etc/passwd")
    (ws.work / "out.txt").write_text("from work")
    ws.promote_artifacts([ArtifactSpec(path="out.txt")])
    assert (ws.output / "out.txt").is_symlink()
    output_failure(ws, "out.txt")


def test_promote_skips_a_declared_artifact_that_was_never_written(ws: Workspace) -> None:
    (ws.work / "b.txt").write_text("b")
    ws.promote_artifacts([ArtifactSpec(path="a.txt"), ArtifactSpec(path="b.txt")])
    assert (ws.output / "b.txt").read_text() == "b"
    assert "missing" in output_failure(ws, "a.txt").message


def test_promote_skips_directories_and_fifos(ws: Workspace) -> None:
    (ws.work / "dir").mkdir()
    os.mkfifo(ws.work / "pipe")
    ws.promote_artifacts([ArtifactSpec(path="dir"), ArtifactSpec(path="pipe")])
    assert list(ws.output.iterdir()) == []


# -- inputs ---------------------------------------------------------------------------


def test_write_inline_and_expose(ws: Workspace) -> None:
    ws.write_inline("params.txt", "héllo")
    ws.write_inline("cfg/deep.json", "{}")
    ws.expose_inputs(["params.txt", "cfg/deep.json"])
    for rel, text in (("params.txt", "héllo"), ("cfg/deep.json", "{}")):
        source = ws.input / rel
        link = ws.work / rel
        assert source.read_text() == text
        assert mode(source) == 0o400
        assert link.is_symlink()
        assert not os.readlink(link).startswith("/")  # relative: survives a moved workspace
        assert link.resolve() == source.resolve()
        assert link.read_text() == text


def test_write_inline_refuses_to_overwrite(ws: Workspace) -> None:
    ws.write_inline("p.txt", "one")
    with pytest.raises(FileExistsError):
        ws.write_inline("p.txt", "two")
    assert (ws.input / "p.txt").read_text() == "one"


def test_expose_does_not_replace_an_existing_work_file(ws: Workspace) -> None:
    ws.write_inline("p.txt", "input")
    (ws.work / "p.txt").write_text("job's own")
    ws.expose_inputs(["p.txt"])
    assert not (ws.work / "p.txt").is_symlink()
    assert (ws.work / "p.txt").read_text() == "job's own"


def test_remove(ws: Workspace) -> None:
    (ws.output / "x").write_text("x")
    ws.remove()
    assert not ws.path.exists()
