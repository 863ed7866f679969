"""Hypothesis strategies for hostile wire data: JSON values, manifests, path tricks."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

# What a JSON parser can hand us: no lone surrogates (the reply parser refuses them).
TEXT_ALPHABET = st.characters(blacklist_categories=("Cs",))
text = st.text(TEXT_ALPHABET, max_size=40)

PATH_TRICKS = st.sampled_from(
    [
        "", ".", "..", "../x", "a/../../x", "/etc/passwd", "//etc", "a//b", "a/./b", "a/",
        "./a", "x\x00y", "-rf", "a/-x", "a\\b", "..\\..\\x", "~", "~/x", "$HOME", "a" * 300,
        "ü/ñ.txt", "\u202e.txt", "con", "a/b/c/d/e/f/g/h", "output/../../x", " ", "\n",
        "input.txt", "out/video.mp4", ".hidden", "a:b", "*", "a?b", "%2e%2e/x",
    ]
)  # fmt: skip
paths = st.one_of(PATH_TRICKS, text, st.from_regex(r"[a-z0-9._/-]{1,20}", fullmatch=True))

JOB_IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    PATH_TRICKS,
    text,
    st.just("j" * 129),
    st.just("j" * 513),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(text, children, max_size=5)
    ),
    max_leaves=20,
)


def huge_list(item: Any) -> st.SearchStrategy[list[Any]]:
    """A list far above every cap (built cheaply: one element, repeated)."""
    return st.integers(min_value=257, max_value=20_000).map(lambda n: [item] * n)


URLS = st.one_of(
    st.sampled_from(
        [
            "https://example.com/in.bin", "http://127.0.0.1:9/x", "file:///etc/passwd",
            "ftp://x/y", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
            "javascript:alert(1)", "http://", "https://user:pw@example.com/a", "h" * 5000,
            "HTTP://EXAMPLE.COM/A", "data:,x", "//example.com/x",
        ]
    ),
    text,
)  # fmt: skip
SHAS = st.one_of(st.just("a" * 64), st.just("A" * 64), st.text("0123456789abcdef", max_size=70))
ENV_KEYS = st.one_of(
    st.sampled_from(
        ["OMP_NUM_THREADS", "LD_PRELOAD", "ld_preload", "PATH", "PYTHONPATH", "AITBC_JOB_ID",
         "HOME", "BASH_ENV", "LC_ALL", "GLIBC_TUNABLES", "JOB_X", "1BAD", "A=B", "", "X\x00"]
    ),
    text,
)  # fmt: skip


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field that is usually well-typed but sometimes any JSON value at all."""
    return st.one_of(strategy, json_values)


input_url = st.fixed_dictionaries(
    {"url": maybe(URLS), "path": maybe(paths)},
    optional={
        "sha256": maybe(SHAS),
        "max_mb": maybe(st.integers(-5, 10**12)),
        "cache": json_values,
    },
)
artifact = st.fixed_dictionaries(
    {"path": maybe(paths)},
    optional={"type": maybe(text), "max_mb": maybe(st.integers(-5, 10**12))},
)
inputs = st.fixed_dictionaries(
    {},
    optional={
        "urls": maybe(st.one_of(st.lists(input_url, max_size=4), huge_list({"url": "x"}))),
        "inline": maybe(st.dictionaries(paths, maybe(text), max_size=4)),
    },
)
requirements = st.fixed_dictionaries(
    {},
    optional={
        "gpu": json_values,
        "gpu_count": maybe(st.integers(-3, 100)),
        "vram_mb": maybe(st.integers(-3, 10**9)),
        "cpu_threads": json_values,
        "mem_mb": json_values,
    },
)

COMMANDS = st.one_of(
    st.sampled_from(
        ["echo", "gzip", "sha256sum", "sleep", "ffmpeg", "/bin/sh", "sh", "rm", "../echo",
         "echo ", "Echo", "echo\x00", "/usr/bin/gzip", ""]
    ),
    text,
)  # fmt: skip
ARGS = st.one_of(
    st.lists(
        st.one_of(
            st.sampled_from(["-k", "-9", "-n", "data.csv", "1", "hello", "-c", "-i", "x" * 5000]),
            text,
        ),
        max_size=12,
    ),
    huge_list("-k"),
)

manifests = st.fixed_dictionaries(
    {
        "job_id": maybe(JOB_IDS),
        "runner": maybe(st.sampled_from(["cli", "python", "CLI", "docker", ""])),
        "timeout_s": maybe(st.integers(-10, 10**9)),
    },
    optional={
        "attempt": maybe(st.integers(-3, 2**40)),
        "command": maybe(COMMANDS),
        "args": maybe(ARGS),
        "task": maybe(st.sampled_from(["example", "os", "a.b", "../x", "x-y", "", "_"])),
        "params": json_values,
        "env": maybe(st.dictionaries(ENV_KEYS, maybe(text), max_size=4)),
        "input": maybe(inputs),
        "artifacts": maybe(st.one_of(st.lists(artifact, max_size=4), huge_list({"path": "a"}))),
        "requirements": maybe(requirements),
        "node_id": json_values,
        "not_after": json_values,
    },
)
any_manifest = st.one_of(manifests, json_values)

# -- mostly valid manifests, then with a few fields made hostile ---------------------------

clean_paths = st.from_regex(r"[a-z][a-z0-9_]{0,8}(/[a-z][a-z0-9_]{0,8}){0,2}(\.[a-z]{1,3})?",
                            fullmatch=True)  # fmt: skip
good_inputs = st.fixed_dictionaries(
    {},
    optional={
        "urls": st.lists(
            st.fixed_dictionaries(
                {"url": st.sampled_from(["https://example.com/a", "http://127.0.0.1:9/b"]),
                 "path": clean_paths},
                optional={"sha256": st.just("a" * 64), "max_mb": st.integers(1, 100)},
            ),
            max_size=2,
            unique_by=lambda u: u["path"],
        ),
        "inline": st.dictionaries(clean_paths, text, max_size=2),
    },
)  # fmt: skip
good_cli = st.fixed_dictionaries(
    {
        "job_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
        "runner": st.just("cli"),
        "timeout_s": st.integers(1, 3600),
        "command": st.sampled_from(["echo", "gzip", "sha256sum", "sleep"]),
        "args": st.lists(st.sampled_from(["-k", "-9", "-n", "data.csv", "1", "hello"]),
                         max_size=4),
    },
    optional={
        "attempt": st.integers(1, 5),
        "artifacts": st.lists(st.fixed_dictionaries({"path": clean_paths}), max_size=2,
                              unique_by=lambda a: a["path"]),
        "env": st.just({}),
        "requirements": st.fixed_dictionaries({}, optional={"gpu": st.booleans()}),
    },
)  # fmt: skip
good_python = st.fixed_dictionaries(
    {
        "job_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
        "runner": st.just("python"),
        "timeout_s": st.integers(1, 3600),
        "task": st.sampled_from(["example", "pkg.mod"]),
    },
    optional={"params": st.dictionaries(text, json_values, max_size=3)},
)
good_manifests = st.tuples(st.one_of(good_cli, good_python), good_inputs).map(
    lambda pair: {**pair[0], **({"input": pair[1]} if pair[1] else {})}
)


@st.composite
def mutated_manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A sound manifest with one to three fields replaced by hostile values."""
    base = dict(draw(good_manifests))
    hostile = draw(manifests)
    for key in draw(st.lists(st.sampled_from(sorted(hostile)), min_size=1, max_size=3)):
        base[key] = hostile[key]
    return base


any_manifest = st.one_of(good_manifests, mutated_manifests(), manifests, json_values)
cli_like = st.one_of(good_cli, mutated_manifests(), manifests)
