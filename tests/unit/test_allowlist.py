"""Unit tests of aitbc_miner.allowlist: loading allowlist files and checking CLI jobs."""

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitbc_miner.allowlist import (
    Allowlist,
    AllowlistEntry,
    AllowlistError,
    Denied,
    load_allowlist,
)

REPO = Path(__file__).resolve().parents[2]

FFMPEG_ARGS = [  # the CONFIG.md sample entry
    ["-y"],
    ["-i", ".+\\.(mp4|wav|mkv)$"],
    ["-c:v", "(libx264|copy)"],
    ["output\\.(mp4|mkv)"],
]

Writer = Callable[..., Path]


@pytest.fixture
def tool(tmp_path: Path) -> Callable[[str], str]:
    """An executable file standing in for a real program (never run)."""

    def _tool(name: str) -> str:
        path = tmp_path / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("#!/bin/false\n")
        path.chmod(0o755)
        return str(path)

    return _tool


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """write(file_name, entry_or_text) → path of a file in tmp_path/allowlist.d."""

    def _write(name: str, entry: Any) -> Path:
        path = tmp_path / "allowlist.d" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(entry if isinstance(entry, str) else yaml.safe_dump(entry))
        return path

    return _write


@pytest.fixture
def allowlist(tmp_path: Path, write: Writer, tool: Callable[[str], str]) -> Allowlist:
    write(
        "ffmpeg.yaml",
        {
            "command": {"path": tool("ffmpeg")},
            "args": FFMPEG_ARGS,
            "env": ["OMP_NUM_THREADS", "MY_[A-Z]+"],
            "max_runtime_s": 7200,
        },
    )
    write(
        "any.yaml",
        {
            "name": "any",
            "command": {"path": tool("anything")},
            "args": [[".*"]],
            "env": [".*"],
            "max_total_args_len": 100_000,
        },
    )
    write(
        "tiny.yaml",
        {"command": {"path": tool("tiny")}, "args": [["[a-z]+"]], "max_total_args_len": 10},
    )
    write("noargs.yaml", {"command": {"path": tool("noargs")}})
    write(
        "pair.yaml",
        {
            "command": {"path": tool("pair")},
            "args": [["--size", "[0-9]+", "[0-9]+"], ["--mode", "fast"], ["--mode", "slow"]],
        },
    )
    write("ghost.yaml", {"command": {"path": str(tmp_path / "not-installed")}})
    return load_allowlist([str(tmp_path / "allowlist.d" / "*.yaml")])


# --- check: argv -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-y", "-i", "input1.mp4", "-c:v", "libx264", "output.mp4"],
        ["output.mkv", "-c:v", "copy", "-i", "a.wav", "-y"],  # any order
        ["-i", "a.mp4", "-i", "b.mkv", "-y", "-y", "output.mp4"],  # options repeat
        ["-i", "dir/x y.mp4", "output.mp4", "output.mkv"],
    ],
)
def test_accepted_argv(allowlist: Allowlist, args: list[str]) -> None:
    entry = allowlist.check("ffmpeg", args, {})
    assert entry.name == "ffmpeg" and entry.max_runtime_s == 7200
    assert os.path.isabs(entry.path)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["-vf", "x"], "argument 0 '-vf' is not allowed for ffmpeg"),
        (["-y", "-i"], "option '-i' (argument 1) needs 1 value"),
        (["-i", "a.avi"], "argument 1 'a.avi' is not an allowed value for option '-i' of ffmpeg"),
        (
            ["-c:v", "libx265"],
            "argument 1 'libx265' is not an allowed value for option '-c:v' of ffmpeg",
        ),
        (["out.mp4"], "argument 0 'out.mp4' is not allowed for ffmpeg"),
        (["-y", "output.mp4", "; rm -rf /"], "argument 2 '; rm -rf /' is not allowed for ffmpeg"),
        (["output.mp4 "], "argument 0 'output.mp4 ' is not allowed for ffmpeg"),  # full match
        (["xoutput.mp4"], "argument 0 'xoutput.mp4' is not allowed for ffmpeg"),
        (["-Y"], "argument 0 '-Y' is not allowed for ffmpeg"),  # flags are literal
        (["-y=1"], "argument 0 '-y=1' is not allowed for ffmpeg"),
        (["-i", "-y"], "argument 1 '-y' is not an allowed value for option '-i' of ffmpeg"),
        (["a\x00b"], "argument 0 contains a NUL byte"),
    ],
)
def test_rejected_argv(allowlist: Allowlist, args: list[str], reason: str) -> None:
    with pytest.raises(Denied) as excinfo:
        allowlist.check("ffmpeg", args, {})
    assert excinfo.value.reason == reason == str(excinfo.value)


def test_option_with_several_values_and_alternative_specs(allowlist: Allowlist) -> None:
    assert allowlist.check("pair", ["--size", "1", "2", "--mode", "slow", "--mode", "fast"], {})
    with pytest.raises(Denied, match=r"option '--size' \(argument 0\) needs 2 values"):
        allowlist.check("pair", ["--size", "1"], {})
    with pytest.raises(Denied, match=r"argument 2 'x' is not an allowed value for option '--size'"):
        allowlist.check("pair", ["--size", "1", "x"], {})
    with pytest.raises(Denied, match=r"argument 1 'medium' is not an allowed value"):
        allowlist.check("pair", ["--mode", "medium"], {})


def test_entry_without_args_allows_none(allowlist: Allowlist) -> None:
    assert allowlist.check("noargs", [], {}).name == "noargs"
    with pytest.raises(Denied, match="argument 0 'x' is not allowed for noargs"):
        allowlist.check("noargs", ["x"], {})


def test_shell_metacharacters_are_just_data(allowlist: Allowlist) -> None:
    args = [";rm -rf /", "$(id)", "`reboot`", "a|b", "x > /etc/passwd", "&&", "'\"", "*"]
    before = list(args)
    assert allowlist.check("any", args, {}).name == "any"
    assert args == before  # returned unchanged, nothing quoted or expanded
    with pytest.raises(Denied, match=r"argument 0 ';rm -rf /' is not allowed for tiny"):
        allowlist.check("tiny", [";rm -rf /"], {})


def test_echoed_value_is_truncated(allowlist: Allowlist) -> None:
    with pytest.raises(Denied) as excinfo:
        allowlist.check("ffmpeg", ["x" * 300], {})
    assert excinfo.value.reason == f"argument 0 {'x' * 64!r}... is not allowed for ffmpeg"


def test_total_args_length_cap(allowlist: Allowlist) -> None:
    assert allowlist.check("tiny", ["abcde", "fghij"], {})
    with pytest.raises(Denied, match="arguments are 11 characters in total; tiny allows 10"):
        allowlist.check("tiny", ["abcde", "fghijk"], {})


def test_single_argument_cap_applies_even_to_dot_star(allowlist: Allowlist) -> None:
    assert allowlist.check("any", ["a" * 4096], {})
    with pytest.raises(Denied, match="argument 1 is longer than 4096 characters"):
        allowlist.check("any", ["ok", "a" * 4097], {})


def test_max_args(allowlist: Allowlist) -> None:
    assert allowlist.check("any", ["a"] * 256, {})
    with pytest.raises(Denied, match=r"too many arguments \(257 > 256\)"):
        allowlist.check("any", ["a"] * 257, {})
    assert allowlist.check("any", ["a"] * 1000, {}, max_args=1000)
    with pytest.raises(Denied, match=r"too many arguments \(3 > 2\)"):
        allowlist.check("any", ["a", "b", "c"], {}, max_args=2)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ("-y", "args must be a list of strings"),
        ([1], "argument 0 is not a string (int)"),
        (["ok", None], "argument 1 is not a string (NoneType)"),
    ],
)
def test_args_of_the_wrong_type(allowlist: Allowlist, args: Any, reason: str) -> None:
    with pytest.raises(Denied) as excinfo:
        allowlist.check("any", args, {})
    assert excinfo.value.reason == reason


# --- check: command --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("rm", "command 'rm' is not allowlisted on this node"),
        ("/bin/rm", "command '/bin/rm' is not allowlisted on this node"),
        ("FFMPEG", "command 'FFMPEG' is not allowlisted on this node"),
        ("", "command '' is not allowlisted on this node"),
        (None, "command NoneType is not allowlisted on this node"),
        (["ffmpeg"], "command list is not allowlisted on this node"),
    ],
)
def test_unknown_command(allowlist: Allowlist, command: Any, reason: str) -> None:
    with pytest.raises(Denied) as excinfo:
        allowlist.check(command, [], {})
    assert excinfo.value.reason == reason


def test_full_path_of_an_allowed_tool_is_not_a_name(allowlist: Allowlist) -> None:
    with pytest.raises(Denied, match="is not allowlisted"):
        allowlist.check(allowlist.entries["ffmpeg"].path, [], {})


def test_unavailable_tool_loads_with_a_warning_and_is_denied(
    allowlist: Allowlist, tmp_path: Path
) -> None:
    ghost = allowlist.entries["not-installed"]
    assert not ghost.available
    assert any("not-installed does not exist or is not executable" in w for w in allowlist.warnings)
    with pytest.raises(Denied) as excinfo:
        allowlist.check("not-installed", [], {})
    assert excinfo.value.reason == "tool 'not-installed' is not installed on this node"


def test_non_executable_file_is_unavailable(write: Writer, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("data")
    plain.chmod(0o644)
    write("plain.yaml", {"command": {"path": str(plain)}})
    write("dir.yaml", {"name": "dir", "command": {"path": str(tmp_path)}})
    loaded = load_allowlist([str(tmp_path / "allowlist.d" / "*.yaml")])
    if os.geteuid() != 0:  # root may execute any file with an x bit; 0644 has none anyway
        assert not loaded.entries["plain"].available
    assert not loaded.entries["dir"].available


# --- check: env ------------------------------------------------------------------------------


def test_env_accepted(allowlist: Allowlist) -> None:
    env = {"OMP_NUM_THREADS": "4", "MY_FLAG": "a b;c$(x)"}
    assert allowlist.check("ffmpeg", [], env).name == "ffmpeg"
    assert allowlist.check("any", [], {"ANYTHING_GOES": "1", "x": ""}).name == "any"


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HOME_DIR": "x"}, "environment variable 'HOME_DIR' is not allowed for ffmpeg"),
        ({"MY_flag": "x"}, "environment variable 'MY_flag' is not allowed for ffmpeg"),
        (
            {"OMP_NUM_THREADSX": "4"},
            "environment variable 'OMP_NUM_THREADSX' is not allowed for ffmpeg",
        ),
        (
            {"OMP_NUM_THREADS": "4\x00"},
            "environment variable 'OMP_NUM_THREADS' contains a NUL byte",
        ),
        ({"OMP_NUM_THREADS": 4}, "environment variable 'OMP_NUM_THREADS' must be a string"),
        ({"A=B": "x"}, "environment variable name 'A=B' is not valid"),
        ({"": "x"}, "environment variable name '' is not valid"),
        ({"BASH_FUNC_x%%": "() { :; }"}, "environment variable name 'BASH_FUNC_x%%' is not valid"),
        ({1: "x"}, "environment variable name int is not valid"),
    ],
)
def test_env_denied(allowlist: Allowlist, env: dict[Any, Any], reason: str) -> None:
    with pytest.raises(Denied) as excinfo:
        allowlist.check("ffmpeg", [], env)
    assert excinfo.value.reason == reason


@pytest.mark.parametrize(
    "key",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "ld_preload",
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "AITBC_JOB_ID",
        "AITBC_OUTPUT_DIR",
        "BASH_ENV",
        "ENV",
        "IFS",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
    ],
)
def test_reserved_env_wins_over_the_allowlist(allowlist: Allowlist, key: str) -> None:
    with pytest.raises(Denied) as excinfo:
        allowlist.check("any", [], {key: "x"})  # the entry allows ".*"
    assert excinfo.value.reason == f"environment variable {key!r} is reserved"


def test_env_must_be_a_mapping(allowlist: Allowlist) -> None:
    with pytest.raises(Denied, match="env must be a mapping of strings"):
        allowlist.check("any", [], [("A", "b")])  # type: ignore[arg-type]


# --- loading ---------------------------------------------------------------------------------


def test_defaults_and_name_key(write: Writer, tool: Callable[[str], str], tmp_path: Path) -> None:
    write("t.yaml", {"name": "transcode", "command": {"path": tool("ffmpeg")}})
    loaded = load_allowlist([str(tmp_path / "allowlist.d" / "t.yaml")])
    entry = loaded.entries["transcode"]
    assert isinstance(entry, AllowlistEntry)
    assert (entry.network, entry.max_total_args_len, entry.max_runtime_s, entry.max_output_mb) == (
        False,
        4096,
        3600,
        1024,
    )
    assert (entry.options, entry.positionals, entry.env) == ((), (), ())
    assert entry.source == str(tmp_path / "allowlist.d" / "t.yaml") and entry.available
    assert "ffmpeg" not in loaded.entries
    with pytest.raises(TypeError):
        loaded.entries["x"] = entry  # type: ignore[index]


def test_patterns_are_compiled_at_load(allowlist: Allowlist) -> None:
    entry = allowlist.entries["ffmpeg"]
    assert [o.flag for o in entry.options] == ["-y", "-i", "-c:v"]
    assert all(isinstance(p, re.Pattern) for o in entry.options for p in o.value_patterns)
    assert [p.pattern for p in entry.positionals] == ["output\\.(mp4|mkv)"]


def test_load_problems_are_all_reported(
    write: Writer, tool: Callable[[str], str], tmp_path: Path
) -> None:
    d = tmp_path / "allowlist.d"
    write("a.yaml", {"command": {"path": tool("a")}, "args": [["-x", "("]], "env": ["[z"]})
    write("b.yaml", {"command": {"path": "bin/b"}})
    write("c.yaml", {"command": {"path": tool("c"), "sha": "x"}, "argz": [], "network": "no"})
    write("d1.yaml", {"command": {"path": tool("dup")}})
    write("d2.yaml", {"name": "dup", "command": {"path": tool("other")}})
    write("e.yaml", "command:\n  path: [unterminated\n")
    write("f.yaml", "- just\n- a list\n")
    write(
        "g.yaml",
        {
            "command": {"path": tool("g")},
            "args": [["a", "b"], "c", []],
            "max_runtime_s": 0,
            "max_output_mb": True,
            "max_total_args_len": "9",
        },
    )
    write("h.yaml", {"args": []})
    write("i.yaml", {"name": "bad name", "command": {"path": tool("i")}})
    with pytest.raises(AllowlistError) as excinfo:
        load_allowlist([str(d / "*.yaml")])
    problems = excinfo.value.problems
    assert str(excinfo.value) == "\n".join(problems)
    expected_starts = [
        f"{d}/a.yaml: args[0][1]: invalid regex '(': missing ), unterminated subpattern",
        f"{d}/a.yaml: env[0]: invalid regex '[z': unterminated character set",
        f"{d}/b.yaml: command.path: must be an absolute path",
        f"{d}/c.yaml: argz: unknown key",
        f"{d}/c.yaml: command.sha: unknown key",
        f"{d}/c.yaml: network: must be true or false",
        f"{d}/d2.yaml: name: duplicate tool name 'dup' (also defined in {d}/d1.yaml)",
        f"{d}/e.yaml: YAML syntax error at line 3",
        f"{d}/f.yaml: top level must be a mapping",
        f"{d}/g.yaml: args[0]: a positional item has exactly one pattern",
        f"{d}/g.yaml: args[1]: must be a non-empty list of strings",
        f"{d}/g.yaml: args[2]: must be a non-empty list of strings",
        f"{d}/g.yaml: max_total_args_len: must be a positive integer",
        f"{d}/g.yaml: max_runtime_s: must be a positive integer",
        f"{d}/g.yaml: max_output_mb: must be a positive integer",
        f"{d}/h.yaml: command: must be a mapping with an absolute path",
        f"{d}/i.yaml: name: 'bad name' must match",
    ]
    assert len(problems) == len(expected_starts), problems
    for problem, start in zip(problems, expected_starts, strict=True):
        assert problem.startswith(start), (problem, start)


def test_duplicate_yaml_keys_in_an_entry(write: Writer, tmp_path: Path) -> None:
    path = write("x.yaml", "command: {path: /bin/echo}\nenv: []\nenv: ['.*']\n")
    with pytest.raises(AllowlistError) as excinfo:
        load_allowlist([str(path)])
    assert excinfo.value.problems == [
        f"{path}: YAML syntax error at line 3, column 1: found duplicate key 'env'"
    ]


def test_globs_sorted_and_literal_paths(
    write: Writer, tool: Callable[[str], str], tmp_path: Path
) -> None:
    for name in ("b", "a", "c"):
        write(f"{name}.yaml", {"command": {"path": tool(name)}})
    d = tmp_path / "allowlist.d"
    loaded = load_allowlist([str(d / "*.yaml"), str(d / "a.yaml"), str(tmp_path / "none/*.yaml")])
    assert list(loaded.entries) == ["a", "b", "c"]  # listed once despite two patterns
    assert loaded.warnings == (f"{tmp_path}/none/*.yaml: matched no allowlist files",)
    with pytest.raises(AllowlistError) as excinfo:
        load_allowlist([str(d / "missing.yaml")])
    assert excinfo.value.problems == [f"{d}/missing.yaml: file not found"]


def test_no_entries_is_a_warning_not_an_error() -> None:
    loaded = load_allowlist([])
    assert dict(loaded.entries) == {}
    assert loaded.warnings == ("no allowlist entries loaded: every CLI job will be denied",)
    with pytest.raises(Denied):
        loaded.check("echo", [], {})


# --- the shipped allowlist.d -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Allowlist:
    return load_allowlist([str(REPO / "allowlist.d" / "*.yaml")])


def test_shipped_files_load(shipped: Allowlist) -> None:
    assert {"echo", "ffmpeg", "sha256sum"} <= set(shipped.entries)
    assert all(not e.network for e in shipped.entries.values())
    ffmpeg = shipped.entries["ffmpeg"]
    assert (ffmpeg.path, ffmpeg.max_runtime_s, ffmpeg.max_output_mb) == (
        "/usr/bin/ffmpeg",
        7200,
        5000,
    )
    if not ffmpeg.available:
        assert any("/usr/bin/ffmpeg" in w for w in shipped.warnings)


@pytest.mark.skipif(not os.access("/bin/echo", os.X_OK), reason="no /bin/echo")
def test_shipped_echo(shipped: Allowlist) -> None:
    assert shipped.check("echo", ["hello", "; rm -rf / $(id)"], {}).path == "/bin/echo"
    with pytest.raises(Denied):
        shipped.check("echo", ["x" * 1025], {})


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (["input1.mp4"], True),
        (["a.txt", "b_2.bin", "--tag"], True),
        (["-b", "x"], True),
        (["../etc/passwd"], False),
        (["/etc/passwd"], False),
        (["-r"], False),
        ([".."], False),
        (["--"], False),
        (["a/b"], False),
        (["x" * 129], False),
        (["-"], False),
    ],
)
def test_shipped_sha256sum(shipped: Allowlist, args: list[str], ok: bool) -> None:
    if not shipped.entries["sha256sum"].available:
        pytest.skip("no /usr/bin/sha256sum")
    if ok:
        assert shipped.check("sha256sum", args, {}).path == "/usr/bin/sha256sum"
    else:
        with pytest.raises(Denied):
            shipped.check("sha256sum", args, {})


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (["-y", "-i", "input1.mp4", "-c:v", "libx264", "output.mp4"], True),
        (["-i", "in/clip.mkv", "output.mkv"], True),
        (["-i", "/etc/x.mp4", "output.mp4"], False),
        (["-i", "../x.mp4", "output.mp4"], False),
        (["-i", "http://evil/x.mp4", "output.mp4"], False),
        (["-i", "concat:a.mp4|b.mp4", "output.mp4"], False),
    ],
)
def test_shipped_ffmpeg_patterns(shipped: Allowlist, args: list[str], ok: bool) -> None:
    entry = shipped.entries["ffmpeg"]
    available = Allowlist({"ffmpeg": dataclasses.replace(entry, available=True)})
    if ok:
        assert available.check("ffmpeg", args, {"OMP_NUM_THREADS": "4"})
    else:
        with pytest.raises(Denied):
            available.check("ffmpeg", args, {})


# --- property: check() only ever raises Denied ---------------------------------------------------

_junk = st.one_of(st.text(max_size=80), st.integers(), st.none(), st.binary(max_size=8))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.one_of(
        st.sampled_from(["ffmpeg", "any", "tiny", "pair", "noargs", "not-installed"]),
        st.text(max_size=20),
    ),
    args=st.one_of(
        st.lists(
            st.one_of(
                st.sampled_from(
                    ["-y", "-i", "-c:v", "--size", "--mode", "output.mp4", "a.mp4", "1", "fast"]
                ),
                st.text(max_size=80),
            ),
            max_size=12,
        ),
        st.lists(_junk, max_size=4),
        st.text(max_size=10),
    ),
    env=st.one_of(
        st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5),
        st.dictionaries(
            st.sampled_from(["OMP_NUM_THREADS", "MY_X", "LD_PRELOAD"]), _junk, max_size=3
        ),
    ),
)
def test_check_only_raises_denied(allowlist: Allowlist, command: str, args: Any, env: Any) -> None:
    snapshot = (list(args) if isinstance(args, list) else args, dict(env))
    try:
        entry = allowlist.check(command, args, env)
    except Denied as exc:
        assert exc.reason and "\n" not in exc.reason  # untrusted text is echoed via repr
    else:
        assert entry is allowlist.entries[command]
    assert (list(args) if isinstance(args, list) else args, dict(env)) == snapshot
