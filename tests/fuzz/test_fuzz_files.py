"""Fuzz the operator-written files: allowlist entries and config (YAML + environment).

Property: loading yields a value or the module's own error (AllowlistError /
ConfigError, one `where: reason` line per problem); nothing else escapes, and a
secret given as the bootstrap token or an HMAC key never appears in a problem line.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from aitbc_miner.allowlist import Allowlist, AllowlistError, load_allowlist
from aitbc_miner.config import ConfigError, MinerConfig, load_config
from tests.fuzz.profile import budget, seen
from tests.fuzz.strategies import json_values, text

SCRATCH = Path(tempfile.mkdtemp(prefix="aitbc-fuzz-files-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
MACHINE_ID = SCRATCH / "machine-id"
MACHINE_ID.write_text("0123456789abcdef0123456789abcdef\n")
SECRET = "S3CRET-fuzz-7f3a9c"

yaml_scalars = st.one_of(
    json_values,
    st.sampled_from(["yes", "off", "~", "null", "0x1F", "1e3", "30s", "15m", "-1", ".inf",
                     "/bin/sh", "../x", "*", "(", "[a-", ".*", "a{1,99999}", "env:NOPE",
                     "env:", "env:HOME", "127.0.0.1:0", "[::1]:9", "http://x"]),
)  # fmt: skip


def dump(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True, sort_keys=False)


raw_yaml = st.one_of(
    text,
    st.sampled_from(["{", "a: [", "- - -", "a: b: c", "%YAML 9.9\n---",
                     "!!python/object:os.system x", "a: &x 1\nb: *y", "a: 1\na: 2", "\t- x",
                     "? [a]\n: b", "---\n...\n---\n"]),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)  # fmt: skip

# -- allowlist entries --------------------------------------------------------------------

patterns = st.one_of(
    st.sampled_from(["-y", "-i", ".+\\.mp4", "(", "[", "a**", "(?P<x", "\\", ".{0,1024}", ""]),
    text,
    json_values,
)
entry_docs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["ffmpeg", "a b", "", "../x", "x" * 70]), yaml_scalars),
        "command": st.one_of(
            st.fixed_dictionaries({"path": st.one_of(
                st.sampled_from(["/bin/echo", "/usr/bin/gzip", "bin/sh", "/nonexistent/x",
                                 "/etc", ""]), yaml_scalars)}),
            yaml_scalars,
        ),
        "args": st.one_of(st.lists(st.one_of(st.lists(patterns, max_size=3), patterns),
                                   max_size=5), yaml_scalars),
        "env": st.one_of(st.lists(st.one_of(patterns, st.sampled_from(
            ["LD_PRELOAD", "PATH", "OMP_.*", "PYTHON.*"])), max_size=4), yaml_scalars),
        "network": yaml_scalars,
        "max_total_args_len": yaml_scalars,
        "max_runtime_s": yaml_scalars,
        "max_output_mb": yaml_scalars,
        "surprise": yaml_scalars,
    },
)  # fmt: skip


GOOD_ENTRY = {
    "name": "tool",
    "command": {"path": "/bin/echo"},
    "args": [["-n"], ["-o", "[a-z]+\\.txt"], ["[A-Za-z0-9_.-]{1,64}"]],
    "env": ["OMP_NUM_THREADS", "JOB_.*"],
    "network": False,
    "max_runtime_s": 60,
}


@st.composite
def mutated_entries(draw: st.DrawFn) -> dict[str, Any]:
    entry = dict(GOOD_ENTRY)
    hostile = draw(entry_docs)
    for key in draw(st.lists(st.sampled_from(sorted(hostile) or ["name"]), max_size=2)):
        if key in hostile:
            entry[key] = hostile[key]
    return entry


@budget(weight=1.0)
@given(doc=st.one_of(mutated_entries().map(dump), entry_docs.map(dump), raw_yaml))
def test_allowlist_files_load_or_raise_allowlist_error(doc: str) -> None:
    seen("allowlist-file")
    path = SCRATCH / "entry.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    try:
        allowlist = load_allowlist([str(path)])
    except AllowlistError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        event("AllowlistError")
        return
    assert isinstance(allowlist, Allowlist)
    for entry in allowlist.entries.values():
        assert entry.path.startswith("/")
    event(f"loaded {len(allowlist.entries)} entries")


# -- config files and environment -------------------------------------------------------------

SECTIONS = {
    "coordinator": ["base_url", "auth_token", "tls_verify", "timeout_s", "allow_insecure_http",
                    "pull_wait_s", "max_response_bytes"],
    "heartbeat": ["interval_s", "jitter_pct", "backoff"],
    "runners": ["cli", "python"],
    "resources": ["max_concurrent_cpu", "cpu_nice", "io_class", "cgroup", "mem_soft_mb"],
    "gpu": ["enable", "policy", "jobs_per_gpu"],
    "workspace": ["root", "keep_success", "min_free_mb"],
    "cache": ["root", "max_gb", "pinned"],
    "security": ["require_signed_manifests", "manifest_keys", "hmac_keys",
                 "allow_private_inputs"],
    "health": ["listen", "enable_metrics"],
    "shutdown": ["grace_s", "kill_grace_s"],
    "logging": ["level", "json", "path"],
    "nope": ["x"],
}  # fmt: skip


@st.composite
def config_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=5, unique=True)):
        keys = draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=4, unique=True))
        doc[section] = {k: draw(yaml_scalars) for k in keys} if keys else draw(yaml_scalars)
    if draw(st.booleans()):
        doc["node_id"] = draw(st.one_of(st.just("node-fuzz"), yaml_scalars))
    where = draw(st.sampled_from(["token", "hmac", "both", "none"]))
    if where in ("token", "both") and isinstance(doc.get("coordinator", {}), dict):
        doc.setdefault("coordinator", {})["auth_token"] = SECRET
    if where in ("hmac", "both") and isinstance(doc.get("security", {}), dict):
        doc.setdefault("security", {})["hmac_keys"] = {"h1": SECRET, "h2": draw(yaml_scalars)}
    return doc


env_names = st.sampled_from(
    ["AITBC_MINER_HEARTBEAT__INTERVAL_S", "AITBC_MINER_SECURITY__HMAC_KEYS",
     "AITBC_MINER_SECURITY__HMAC_KEYS__H9", "AITBC_MINER_COORDINATOR__BASE_URL",
     "AITBC_MINER_COORDINATOR__AUTH_TOKEN", "AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES",
     "AITBC_MINER_NOPE", "AITBC_MINER_", "AITBC_MINER_HEALTH", "AITBC_MINER_A__B__C__D",
     "MINER_AUTH", "aitbc_miner_logging__level"]
)  # fmt: skip
env_values = yaml_scalars.map(lambda v: v if isinstance(v, str) else json.dumps(v))
# Where the secret may legitimately be given through the environment.
secret_env = st.fixed_dictionaries(
    {},
    optional={
        "AITBC_MINER_COORDINATOR__AUTH_TOKEN": st.just(SECRET),
        "AITBC_MINER_SECURITY__HMAC_KEYS": st.builds(
            lambda other: json.dumps({"h1": SECRET, "h2": other}), json_values),
        "AITBC_MINER_SECURITY__HMAC_KEYS__H9": st.just(SECRET),
    },
)  # fmt: skip


@budget(weight=1.5)
@given(
    doc=st.one_of(config_docs().map(dump), raw_yaml),
    environ=st.tuples(st.dictionaries(env_names, env_values, max_size=4), secret_env).map(
        lambda pair: {**pair[0], **pair[1]}
    ),
)
def test_config_loads_or_raises_config_error_without_echoing_secrets(
    doc: str, environ: dict[str, str]
) -> None:
    seen("config")
    path = SCRATCH / "config.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    env = {"MINER_AUTH": SECRET, "AITBC_MINER_WORKSPACE__ROOT": str(SCRATCH / "ws"), **environ}
    try:
        cfg = load_config(path, env, machine_id_path=str(MACHINE_ID))
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert all(SECRET not in p for p in exc.problems), exc.problems
        event("ConfigError")
        return
    assert isinstance(cfg, MinerConfig)
    assert SECRET not in repr(cfg)
    event("loaded")
