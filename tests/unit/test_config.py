"""Unit tests of aitbc_miner.config: defaults, YAML + env precedence, every error class."""

import base64
import json
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from aitbc_miner.config import (
    ConfigError,
    MinerConfig,
    load_config,
    parse_duration,
    redacted_dump,
    split_host_port,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok-SUPER-secret-4711"
HMAC_SECRET = "hmac-VERY-secret-0815"


@pytest.fixture
def machine_id(tmp_path: Path) -> str:
    path = tmp_path / "machine-id"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    return str(path)


@pytest.fixture
def load(tmp_path: Path, machine_id: str):
    """load(yaml_text, env) with MINER_AUTH set and a fake machine id."""

    def _load(text: str = "", env: dict[str, str] | None = None, name: str = "config.yaml"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return load_config(path, {"MINER_AUTH": TOKEN, **(env or {})}, machine_id_path=machine_id)

    return _load


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    assert str(excinfo.value) == "\n".join(excinfo.value.problems)
    return excinfo.value.problems


def ed25519_b64() -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# --- defaults and shipped files -----------------------------------------------------------


def test_defaults_are_the_contract_values(machine_id: str) -> None:
    cfg = load_config(None, {"MINER_AUTH": TOKEN}, machine_id_path=machine_id)
    assert cfg.node_id == "node-0123456789ab"
    co = cfg.coordinator
    assert co.base_url == "https://coordinator.local/api/v1"
    assert co.auth_token.get_secret_value() == TOKEN
    assert (co.tls_verify, co.timeout_s, co.allow_insecure_http, co.pull_wait_s) == (
        True,
        20.0,
        False,
        20.0,
    )
    assert (co.progress_min_interval_s, co.max_response_bytes) == (5.0, 1048576)
    hb = cfg.heartbeat
    assert (hb.interval_s, hb.jitter_pct, hb.backoff.min_s, hb.backoff.max_s) == (15, 10, 5, 120)
    assert cfg.runners.cli.enable and cfg.runners.python.enable
    assert cfg.runners.cli.allowlist_files == ("/etc/aitbc/miner/allowlist.d/*.yaml",)
    assert cfg.runners.cli.max_args == 256
    assert cfg.runners.python.task_paths == (Path("/usr/local/lib/aitbc/miner/tasks"),)
    assert cfg.runners.python.venv == Path("/usr/local/lib/aitbc/miner/.venv")
    res = cfg.resources
    assert (res.max_concurrent_cpu, res.max_concurrent_gpu, res.cpu_nice) == (2, 1, 10)
    assert (res.io_class, res.io_level, res.mem_soft_mb, res.cgroup) == (
        "best-effort",
        6,
        16384,
        "auto",
    )
    assert (cfg.gpu.enable, cfg.gpu.policy, cfg.gpu.jobs_per_gpu) == (True, "least-used-vram", 1)
    ws = cfg.workspace
    assert (ws.root, ws.keep_success, ws.keep_failed) == (
        Path("/var/lib/aitbc/miner/jobs"),
        86400.0,
        604800.0,
    )
    assert (ws.exec_log_max_mb, ws.min_free_mb) == (16, 1024)
    assert cfg.upload.chunk_threshold_mb == 8
    assert (cfg.cache.root, cfg.cache.max_gb, cfg.cache.pinned) == (
        Path("/var/cache/aitbc/miner"),
        100,
        (),
    )
    sec = cfg.security
    assert (sec.require_signed_manifests, sec.manifest_keys, sec.hmac_keys) == (True, {}, {})
    assert sec.allow_private_inputs is False
    assert (cfg.health.listen, cfg.health.enable_metrics) == ("127.0.0.1:9464", True)
    assert cfg.health.address() == ("127.0.0.1", 9464)
    assert (cfg.shutdown.grace_s, cfg.shutdown.kill_grace_s) == (300.0, 10.0)
    assert (cfg.logging.level, cfg.logging.json_, cfg.logging.path) == (
        "info",
        True,
        "/var/log/aitbc/miner/miner.jsonl",
    )
    assert cfg.logging.json is True


def test_logging_json_key(load) -> None:
    assert load("logging: {json: false}").logging.json is False
    assert load("", env={"AITBC_MINER_LOGGING__JSON": "0"}).logging.json is False


def test_shipped_production_file_equals_the_defaults(machine_id: str) -> None:
    env = {"MINER_AUTH": TOKEN}
    shipped = load_config(REPO / "etc" / "config.yaml", env, machine_id_path=machine_id)
    defaults = load_config(None, env, machine_id_path=machine_id)
    assert redacted_dump(shipped) == redacted_dump(defaults)


def test_shipped_dev_file_loads_and_resolves_against_its_directory(machine_id: str) -> None:
    cfg = load_config(
        REPO / "etc" / "config.dev.yaml", {"MINER_AUTH": TOKEN}, machine_id_path=machine_id
    )
    assert cfg.coordinator.base_url == "http://127.0.0.1:8080/api/v1"
    assert cfg.runners.cli.allowlist_files == (str(REPO / "allowlist.d" / "*.yaml"),)
    assert cfg.runners.python.task_paths == (REPO / "aitbc_miner" / "tasks",)
    assert cfg.runners.python.venv == REPO / ".venv"
    assert cfg.workspace.root.is_relative_to(REPO / ".demo")
    assert cfg.cache.root.is_relative_to(REPO / ".demo")
    assert (cfg.heartbeat.interval_s, cfg.heartbeat.backoff.min_s) == (2.0, 0.2)
    assert cfg.health.address() == ("127.0.0.1", 0)
    assert cfg.logging.path == ""
    assert cfg.security.require_signed_manifests and cfg.security.manifest_keys == {}


def test_dev_file_without_miner_auth_names_the_variable(machine_id: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(REPO / "etc" / "config.dev.yaml", {}, machine_id_path=machine_id)
    assert problems_of(excinfo) == [
        "coordinator.auth_token: environment variable MINER_AUTH is not set"
    ]


def test_empty_file_means_defaults(load) -> None:
    assert load("").heartbeat.interval_s == 15.0


def test_config_is_frozen(load) -> None:
    cfg = load("")
    with pytest.raises(ValidationError):
        cfg.heartbeat.interval_s = 1  # type: ignore[misc]


# --- YAML + environment ------------------------------------------------------------------------


def test_env_override_wins_over_yaml(load) -> None:
    cfg = load(
        """
        heartbeat: {interval_s: 30, jitter_pct: 20}
        runners: {cli: {enable: true}}
        """,
        env={
            "AITBC_MINER_HEARTBEAT__INTERVAL_S": "5",
            "AITBC_MINER_RUNNERS__CLI__ENABLE": "false",
            "AITBC_MINER_WORKSPACE__KEEP_SUCCESS": "15m",
        },
    )
    assert cfg.heartbeat.interval_s == 5.0
    assert cfg.heartbeat.jitter_pct == 20  # untouched YAML value survives the merge
    assert cfg.runners.cli.enable is False
    assert cfg.workspace.keep_success == 900.0


def test_env_json_dict_and_list_overrides(load) -> None:
    key = ed25519_b64()
    cfg = load(
        "security: {manifest_keys: {}}",
        env={
            "AITBC_MINER_SECURITY__MANIFEST_KEYS": json.dumps({"mock-ed25519": key}),
            "AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES": '["/a/*.yaml", "/b/x.yaml"]',
            "AITBC_MINER_SECURITY__HMAC_KEYS__K1": "env:HMAC_K1",
            "HMAC_K1": HMAC_SECRET,
        },
    )
    assert cfg.security.manifest_keys == {"mock-ed25519": key}
    assert len(cfg.security.manifest_key_bytes()["mock-ed25519"]) == 32
    assert cfg.runners.cli.allowlist_files == ("/a/*.yaml", "/b/x.yaml")
    assert cfg.security.hmac_keys["k1"].get_secret_value() == HMAC_SECRET


def test_whole_section_as_json_env(load) -> None:
    cfg = load("", env={"AITBC_MINER_HEARTBEAT": '{"interval_s": "1m"}'})
    assert cfg.heartbeat.interval_s == 60.0


def test_env_override_of_auth_token_needs_no_miner_auth(tmp_path: Path, machine_id: str) -> None:
    cfg = load_config(
        None, {"AITBC_MINER_COORDINATOR__AUTH_TOKEN": TOKEN}, machine_id_path=machine_id
    )
    assert cfg.coordinator.auth_token.get_secret_value() == TOKEN


def test_an_overridden_env_reference_in_the_file_is_not_resolved(
    tmp_path: Path, machine_id: str
) -> None:
    """`aitbc-miner probe --config /etc/aitbc/miner/config.yaml` without MINER_AUTH."""
    path = tmp_path / "config.yaml"
    path.write_text('coordinator: {auth_token: "env:MINER_AUTH"}\nlogging: {level: "env:NOPE"}\n')
    env = {"AITBC_MINER_COORDINATOR__AUTH_TOKEN": TOKEN, "AITBC_MINER_LOGGING": '{"level": "info"}'}
    cfg = load_config(path, env, machine_id_path=machine_id)  # no MINER_AUTH, no NOPE
    assert cfg.coordinator.auth_token.get_secret_value() == TOKEN
    assert cfg.logging.level == "info"
    with pytest.raises(ConfigError, match="NOPE"):  # a reference nothing replaces: still an error
        load_config(
            path, {"AITBC_MINER_COORDINATOR__AUTH_TOKEN": TOKEN}, machine_id_path=machine_id
        )


def test_os_environ_is_not_read_when_environ_is_given(monkeypatch, machine_id: str) -> None:
    monkeypatch.setenv("AITBC_MINER_HEARTBEAT__INTERVAL_S", "99")
    monkeypatch.setenv("MINER_AUTH", "from-os-environ")
    with pytest.raises(ConfigError):  # MINER_AUTH is not in the given mapping
        load_config(None, {}, machine_id_path=machine_id)
    cfg = load_config(None, {"MINER_AUTH": TOKEN}, machine_id_path=machine_id)
    assert cfg.heartbeat.interval_s == 15.0


def test_os_environ_is_the_default(monkeypatch, machine_id: str) -> None:
    monkeypatch.setenv("AITBC_MINER_HEARTBEAT__INTERVAL_S", "7")
    monkeypatch.setenv("MINER_AUTH", TOKEN)
    assert load_config(None, machine_id_path=machine_id).heartbeat.interval_s == 7.0


def test_env_reference_works_for_any_string(load) -> None:
    cfg = load(
        """
        logging: {level: "env:LOG_LEVEL"}
        coordinator: {auth_token: "env:OTHER_TOKEN"}
        """,
        env={"LOG_LEVEL": "debug", "OTHER_TOKEN": "x"},
    )
    assert cfg.logging.level == "debug"
    assert cfg.coordinator.auth_token.get_secret_value() == "x"


def test_tls_verify_false_from_env_is_a_bool(load) -> None:
    cfg = load("", env={"AITBC_MINER_COORDINATOR__TLS_VERIFY": "false"})
    assert cfg.coordinator.tls_verify is False


def test_bare_yaml_off_for_cgroup(load) -> None:
    assert load("resources: {cgroup: off}").resources.cgroup == "off"


def test_null_section_means_defaults(load) -> None:
    assert load("upload:\nheartbeat:\n").upload.chunk_threshold_mb == 8


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
        ("30", 30.0),
        ("30s", 30.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        (" 2m ", 120.0),
        ("0.2s", 0.2),
        ("10S", 10.0),
        (".5", 0.5),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "1 fortnight",
        "",
        "5ms",
        "-5",
        "1e3",
        "nan",
        "inf",
        "s",
        "1w",
        "1h30m",
        True,
        None,
        float("inf"),
        float("nan"),
        [1],
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_bad_duration_names_the_field(load) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("workspace: {keep_success: 1 fortnight}")
    assert problems_of(excinfo) == [
        "workspace.keep_success: invalid duration '1 fortnight' (use seconds or 30s/15m/24h/7d)"
    ]


# --- error classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("heartbeat: {intervall_s: 5}", "heartbeat.intervall_s: unknown key"),
        ("heartbeat: {backoff: {mins: 5}}", "heartbeat.backoff.mins: unknown key"),
        ("runners: {cli: {allowlist: []}}", "runners.cli.allowlist: unknown key"),
        ("colour: blue", "colour: unknown key"),
        ("_env_file: x", "_env_file: unknown key"),
        ("heartbeat: {interval_s: 0}", "heartbeat.interval_s: must be > 0"),
        ("heartbeat: {jitter_pct: 51}", "heartbeat.jitter_pct: must be <= 50"),
        ("heartbeat: {jitter_pct: -1}", "heartbeat.jitter_pct: must be >= 0"),
        ("heartbeat: {backoff: {min_s: 0}}", "heartbeat.backoff.min_s: must be > 0"),
        (
            "heartbeat: {backoff: {min_s: 10s, max_s: 5s}}",
            "heartbeat.backoff.min_s: must be <= max_s (5)",
        ),
        ("coordinator: {timeout_s: 0}", "coordinator.timeout_s: must be > 0"),
        ("coordinator: {pull_wait_s: -1}", "coordinator.pull_wait_s: must be >= 0"),
        ("coordinator: {pull_wait_s: 301}", "coordinator.pull_wait_s: must be <= 300"),
        ("resources: {max_concurrent_cpu: -1}", "resources.max_concurrent_cpu: must be >= 0"),
        (
            "resources: {max_concurrent_cpu: 0, max_concurrent_gpu: 0}",
            "resources.max_concurrent_cpu: max_concurrent_cpu and max_concurrent_gpu cannot both be 0",
        ),
        ("resources: {cpu_nice: 20}", "resources.cpu_nice: must be <= 19"),
        ("resources: {io_class: realtime}", "resources.io_class: must be 'best-effort' or 'idle'"),
        ("resources: {io_level: 8}", "resources.io_level: must be <= 7"),
        ("resources: {mem_soft_mb: 0}", "resources.mem_soft_mb: must be > 0"),
        ("resources: {cgroup: maybe}", "resources.cgroup: must be 'auto', 'off' or 'required'"),
        ("gpu: {policy: round-robin}", "gpu.policy: must be 'least-used-vram'"),
        ("gpu: {jobs_per_gpu: 0}", "gpu.jobs_per_gpu: must be >= 1"),
        ("upload: {chunk_threshold_mb: 0}", "upload.chunk_threshold_mb: must be > 0"),
        ("cache: {max_gb: 0}", "cache.max_gb: must be > 0"),
        (
            "cache: {pinned: [ABC]}",
            "cache.pinned[0]: must be a sha256 as 64 lowercase hex characters",
        ),
        (
            "health: {listen: localhost}",
            'health.listen: must be "" or host:port / [v6]:port with port 0..65535',
        ),
        ("shutdown: {grace_s: -1}", "shutdown.grace_s: must be >= 0"),
        ("logging: {level: loud}", "logging.level: must be 'debug', 'info', 'warning' or 'error'"),
        (
            "logging: {json: maybe}",
            "logging.json: must be a valid boolean, unable to interpret input",
        ),
        ("node_id: '-bad'", "node_id: must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
        (
            "runners: {cli: {allowlist_files: '/x/*.yaml'}}",
            "runners.cli.allowlist_files: must be a list",
        ),
        ("runners: {cli: {max_args: 0}}", "runners.cli.max_args: must be >= 1"),
        (
            "workspace: {root: ''}",
            "workspace.root: must be a non-empty absolute path "
            "(relative ones resolve against the config file's directory)",
        ),
        ("security: {hmac_keys: {k: ''}}", "security.hmac_keys.k: must not be empty"),
        ("heartbeat: []", "heartbeat: must be a mapping"),
        ("security: {manifest_keys: [a]}", "security.manifest_keys: must be a mapping"),
        (
            "coordinator: {tls_verify: 3}",
            "coordinator.tls_verify: must be true, false or a path to a CA bundle file",
        ),
        (
            "coordinator: {tls_verify: /nonexistent/ca.pem}",
            "coordinator.tls_verify: CA bundle file not found (use true, false or a CA bundle path)",
        ),
        ("1: x", "1: keys must be strings"),
    ],
)
def test_each_problem_names_its_field(load, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(text)
    assert problems_of(excinfo) == [problem]


def test_all_problems_are_collected(load) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(
            """
            coordinator: {base_url: "http://example.com", timeout_s: 0}
            heartbeat: {intervall_s: 5, jitter_pct: 99}
            workspace: {keep_failed: forever}
            """,
            env={"AITBC_MINER_NOPE": "1"},
        )
    assert problems_of(excinfo) == [
        "AITBC_MINER_NOPE: unknown setting (no config key nope)",
        "coordinator.base_url: plain http:// is only allowed for loopback hosts "
        "(set coordinator.allow_insecure_http to override)",
        "coordinator.timeout_s: must be > 0",
        "heartbeat.jitter_pct: must be <= 50",
        "heartbeat.intervall_s: unknown key",
        "workspace.keep_failed: invalid duration 'forever' (use seconds or 30s/15m/24h/7d)",
    ]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        (
            "AITBC_MINER_HEARTBEAT__INTERVALL_S",
            "5",
            "AITBC_MINER_HEARTBEAT__INTERVALL_S: unknown setting (no config key heartbeat.intervall_s)",
        ),
        (
            "AITBC_MINER_COLOUR",
            "blue",
            "AITBC_MINER_COLOUR: unknown setting (no config key colour)",
        ),
        (
            "AITBC_MINER_HEARTBEAT__INTERVAL_S__X",
            "5",
            "AITBC_MINER_HEARTBEAT__INTERVAL_S__X: unknown setting "
            "(no config key heartbeat.interval_s.x)",
        ),
        (
            "AITBC_MINER_SECURITY__MANIFEST_KEYS",
            "{not json",
            "AITBC_MINER_SECURITY__MANIFEST_KEYS: invalid JSON "
            "(Expecting property name enclosed in double quotes at column 2)",
        ),
        (
            "AITBC_MINER_HEARTBEAT__INTERVAL_S",
            "soon",
            "heartbeat.interval_s: invalid duration 'soon' (use seconds or 30s/15m/24h/7d)",
        ),
    ],
)
def test_env_override_problems(load, name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("", env={name: value})
    assert problems_of(excinfo) == [problem]


def test_missing_env_reference(load) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("""
            coordinator: {auth_token: "env:MINER_AUTH_X"}
            security: {hmac_keys: {k1: "env:HMAC_K1"}}
            """)
    assert problems_of(excinfo) == [
        "coordinator.auth_token: environment variable MINER_AUTH_X is not set",
        "security.hmac_keys.k1: environment variable HMAC_K1 is not set",
    ]


def test_malformed_env_reference(load) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load('logging: {path: "env:1-BAD"}')
    assert problems_of(excinfo) == ["logging.path: invalid reference 'env:1-BAD' (use env:NAME)"]


# --- coordinator.base_url --------------------------------------------------------------

HTTP_REFUSED = (
    "coordinator.base_url: plain http:// is only allowed for loopback hosts "
    "(set coordinator.allow_insecure_http to override)"
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://coord.example/api/v1/", "https://coord.example/api/v1"),
        ("https://coord.example:8443/api/v1", "https://coord.example:8443/api/v1"),
        ("http://localhost:8080/api/v1", "http://localhost:8080/api/v1"),
        ("http://127.0.0.1:8080/api/v1/", "http://127.0.0.1:8080/api/v1"),
        ("http://127.1.2.3/api", "http://127.1.2.3/api"),
        ("http://[::1]:8080/api", "http://[::1]:8080/api"),
    ],
)
def test_base_url_accepted(load, url: str, expected: str) -> None:
    assert load(f"coordinator: {{base_url: '{url}'}}").coordinator.base_url == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/api",
        "http://10.0.0.1:8080",
        "http://128.0.0.1",
        "http://localhost.evil.com",
    ],
)
def test_plain_http_to_non_loopback_is_refused(load, url: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(f"coordinator: {{base_url: '{url}'}}")
    assert problems_of(excinfo) == [HTTP_REFUSED]


def test_plain_http_allowed_with_flag(load) -> None:
    cfg = load("coordinator: {base_url: 'http://example.com/api/', allow_insecure_http: true}")
    assert cfg.coordinator.base_url == "http://example.com/api"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://coord.example", "must be an http:// or https:// URL with a host"),
        ("https:///api", "must be an http:// or https:// URL with a host"),
        ("coord.example/api", "must be an http:// or https:// URL with a host"),
        ("https://u:p@coord.example", "must not embed credentials (use coordinator.auth_token)"),
        ("https://coord.example:99999", "has an invalid port"),
        ("https://coord.example/a b", "must not contain whitespace or control characters"),
        ("https://coord.example/?x=1", "must not have a query or fragment"),
    ],
)
def test_malformed_base_url(load, url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(f"coordinator: {{base_url: '{url}'}}")
    assert problems_of(excinfo) == [f"coordinator.base_url: {reason}"]


# --- keys and secrets ----------------------------------------------------------------------


def test_manifest_keys_valid_and_invalid(load) -> None:
    good = ed25519_b64()
    assert load(f"security: {{manifest_keys: {{k1: '{good}'}}}}").security.manifest_keys == {
        "k1": good
    }
    with pytest.raises(ConfigError) as excinfo:
        load(f"""
            security:
              manifest_keys:
                good: "{good}"
                k-short: "{base64.b64encode(b"x" * 31).decode()}"
                k-junk: "not base64!"
            """)
    assert problems_of(excinfo) == [
        "security.manifest_keys.k-short: decodes to 31 bytes; "
        "an ed25519 public key is 32 raw bytes",
        "security.manifest_keys.k-junk: not valid base64 "
        "(expected a raw 32-byte ed25519 public key)",
    ]


def test_secrets_never_appear_in_errors_or_repr(load) -> None:
    env = {"HMAC_K1": HMAC_SECRET}
    text = f"""
        coordinator: {{auth_token: "{TOKEN}", timeout_s: -1, base_url: "ftp://x"}}
        security: {{hmac_keys: {{k1: "env:HMAC_K1", k2: "{HMAC_SECRET}", k3: 12}}}}
        heartbeat: {{interval_s: "nope"}}
        """
    with pytest.raises(ConfigError) as excinfo:
        load(text, env=env)
    message = str(excinfo.value) + repr(excinfo.value)
    assert TOKEN not in message and HMAC_SECRET not in message
    cfg = load('security: {hmac_keys: {k1: "env:HMAC_K1"}}', env=env)
    shown = repr(cfg) + str(cfg) + repr(cfg.coordinator) + repr(cfg.security)
    assert TOKEN not in shown and HMAC_SECRET not in shown
    dump = redacted_dump(cfg)
    assert dump["coordinator"]["auth_token"] == "***"
    assert dump["security"]["hmac_keys"] == {"k1": "***"}
    assert TOKEN not in json.dumps(dump) and HMAC_SECRET not in json.dumps(dump)


def test_secret_not_echoed_from_a_yaml_syntax_error(load) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(f'coordinator:\n  auth_token: "{TOKEN}\n  timeout_s: 5\n')
    assert TOKEN not in str(excinfo.value)


def test_redacted_dump_is_plain_data(load) -> None:
    dump = redacted_dump(load(""))
    assert json.loads(json.dumps(dump)) == dump
    assert dump["logging"]["json"] is True
    assert dump["workspace"]["root"] == "/var/lib/aitbc/miner/jobs"


# --- files -----------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line(load, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("heartbeat:\n  interval_s: [1,\n  jitter_pct: 3\n")
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{tmp_path / 'config.yaml'}: YAML syntax error at line 4")


def test_duplicate_yaml_key_is_an_error(load, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("heartbeat:\n  interval_s: 1\n  interval_s: 2\n")
    assert problems_of(excinfo) == [
        f"{tmp_path / 'config.yaml'}: YAML syntax error at line 3, column 3: "
        "found duplicate key 'interval_s'"
    ]


def test_top_level_must_be_a_mapping(load, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load("- a\n- b\n")
    assert problems_of(excinfo) == [
        f"{tmp_path / 'config.yaml'}: the top level must be a mapping of sections, not list"
    ]


def test_missing_and_unreadable_file(tmp_path: Path, machine_id: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "nope.yaml", {}, machine_id_path=machine_id)
    assert problems_of(excinfo) == [f"{tmp_path / 'nope.yaml'}: file not found"]
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path, {}, machine_id_path=machine_id)
    assert problems_of(excinfo)[0].startswith(f"{tmp_path}: cannot read")


def test_relative_paths_resolve_against_the_config_directory(load, tmp_path: Path) -> None:
    (tmp_path / "etc" / "ca.pem").parent.mkdir()
    (tmp_path / "etc" / "ca.pem").write_text("pem")
    cfg = load(
        """
        coordinator: {tls_verify: ca.pem}
        runners:
          cli: {allowlist_files: ["../allowlist.d/*.yaml", "/abs/x.yaml"]}
          python: {task_paths: [tasks], venv: ../venv}
        workspace: {root: ../state/jobs}
        cache: {root: cache}
        logging: {path: ../log/miner.jsonl}
        """,
        name="etc/config.yaml",
    )
    assert cfg.coordinator.tls_verify == str(tmp_path / "etc" / "ca.pem")
    assert cfg.runners.cli.allowlist_files == (
        str(tmp_path / "allowlist.d" / "*.yaml"),
        "/abs/x.yaml",
    )
    assert cfg.runners.python.task_paths == (tmp_path / "etc" / "tasks",)
    assert cfg.runners.python.venv == tmp_path / "venv"
    assert cfg.workspace.root == tmp_path / "state" / "jobs"
    assert cfg.cache.root == tmp_path / "etc" / "cache"
    assert cfg.logging.path == str(tmp_path / "log" / "miner.jsonl")


def test_relative_env_override_paths_resolve_against_cwd(load, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load(
        "workspace: {root: ../from-yaml}",
        name="etc/config.yaml",
        env={
            "AITBC_MINER_WORKSPACE__ROOT": "ws",
            "AITBC_MINER_RUNNERS__PYTHON__TASK_PATHS": '["t"]',
        },
    )
    assert cfg.workspace.root == work / "ws"
    assert cfg.runners.python.task_paths == (work / "t",)


# --- health.listen ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_address(listen: str, address: tuple[str, int]) -> None:
    assert split_host_port(listen) == address


@pytest.mark.parametrize(
    "listen",
    [
        "localhost",
        ":80",
        "[::1]",
        "[nothost]:80",
        "::1:80",
        "host:65536",
        "host:-1",
        "host:x",
        "a b:1",
    ],
)
def test_listen_address_rejected(listen: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_host_port(listen)


def test_listen_empty_disables(load) -> None:
    assert load("health: {listen: ''}").health.address() is None


# --- node_id ---------------------------------------------------------------------------------


def test_node_id_from_machine_id(load) -> None:
    assert load("").node_id == "node-0123456789ab"


def test_explicit_node_id_wins(load) -> None:
    assert load("node_id: rig-7.a_b").node_id == "rig-7.a_b"
    assert load("", env={"AITBC_MINER_NODE_ID": "from-env"}).node_id == "from-env"


@pytest.mark.parametrize("machine_id_text", [None, "", "\n", "not-hex-at-all"])
def test_node_id_fallback_is_persisted(tmp_path: Path, machine_id_text: str | None) -> None:
    machine_id = tmp_path / "machine-id"
    if machine_id_text is not None:
        machine_id.write_text(machine_id_text)
    root = tmp_path / "var" / "lib" / "jobs"
    env = {"MINER_AUTH": TOKEN, "AITBC_MINER_WORKSPACE__ROOT": str(root)}
    first = load_config(None, env, machine_id_path=str(machine_id))
    assert first.node_id.startswith("node-") and len(first.node_id) == 17
    stored = tmp_path / "var" / "lib" / "node_id"
    assert stored.read_text().strip() == first.node_id
    assert not root.exists()  # only the parent was needed
    again = load_config(None, env, machine_id_path=str(machine_id))
    assert again.node_id == first.node_id
    assert [p.name for p in stored.parent.iterdir()] == ["node_id"]  # no temp files left


def test_corrupt_persisted_node_id_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("../../etc\n")
    env = {"MINER_AUTH": TOKEN, "AITBC_MINER_WORKSPACE__ROOT": str(tmp_path / "jobs")}
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env, machine_id_path=str(tmp_path / "missing"))
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"node_id: {tmp_path / 'node_id'} does not hold a valid node id")


def test_unwritable_node_id_location_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    env = {"MINER_AUTH": TOKEN, "AITBC_MINER_WORKSPACE__ROOT": str(blocker / "var" / "jobs")}
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env, machine_id_path=str(tmp_path / "missing"))
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"node_id: cannot persist a generated id at {blocker}/var/node_id")


def test_no_node_id_file_written_when_config_is_invalid(tmp_path: Path) -> None:
    env = {
        "MINER_AUTH": TOKEN,
        "AITBC_MINER_WORKSPACE__ROOT": str(tmp_path / "jobs"),
        "AITBC_MINER_HEARTBEAT__INTERVAL_S": "0",
    }
    with pytest.raises(ConfigError):
        load_config(None, env, machine_id_path=str(tmp_path / "missing"))
    assert not (tmp_path / "node_id").exists()


def test_miner_config_is_the_settings_class() -> None:
    assert MinerConfig.model_config["env_prefix"] == "AITBC_MINER_"
    assert MinerConfig.model_config["env_nested_delimiter"] == "__"


def test_a_value_from_the_environment_is_never_echoed_in_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("heartbeat:\n  interval_s: env:MINER_AUTH\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"MINER_AUTH": "S3CRET-token-value"})
    assert "S3CRET" not in str(info.value)
    assert "heartbeat.interval_s" in str(info.value) and "MINER_AUTH" in str(info.value)
