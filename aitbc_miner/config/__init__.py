"""Configuration: one frozen, typed tree from a YAML file plus ``AITBC_MINER_*`` environment.

For: turning ``--config PATH`` and the environment into a validated :class:`MinerConfig`
(the contract is CONFIG.md), or a :class:`ConfigError` that lists every problem as
``section.key: reason``. Each component then receives only its own branch.
Must not: touch the network, import trio, configure logging, or echo a secret
(``coordinator.auth_token``, ``security.hmac_keys`` values) in an error or a repr.
Its only file-system effects are reading the config file and ``/etc/machine-id``
and, when there is no machine id, persisting a generated node id.

This package is the public import path; its modules are:
``values`` (scalar parsers and value types) [pure], ``models`` (the section models)
[pure], ``problems`` (ConfigError, pydantic errors as ``section.key: reason``) [pure],
``env`` (``AITBC_MINER_*`` overrides, ``env:NAME`` references) [pure],
``yaml_file`` (strict YAML reading) [io: fs], ``node_id`` (machine id, persisted
node id) [io: fs], ``loader`` (:func:`load_config`, :func:`redacted_dump`) [io: fs].
"""

# `X as X` marks a re-export: every name importable from the single-module config before
# the split stays importable from here; __all__ is the supported surface.
from .loader import DEFAULT_AUTH_TOKEN as DEFAULT_AUTH_TOKEN
from .loader import load_config, redacted_dump
from .models import ENV_DELIMITER as ENV_DELIMITER
from .models import ENV_PREFIX as ENV_PREFIX
from .models import BackoffConfig as BackoffConfig
from .models import CacheConfig as CacheConfig
from .models import CliRunnerConfig as CliRunnerConfig
from .models import CoordinatorConfig as CoordinatorConfig
from .models import GpuConfig as GpuConfig
from .models import HealthConfig as HealthConfig
from .models import HeartbeatConfig as HeartbeatConfig
from .models import LoggingConfig as LoggingConfig
from .models import MinerConfig
from .models import PythonRunnerConfig as PythonRunnerConfig
from .models import ResourcesConfig as ResourcesConfig
from .models import RunnersConfig as RunnersConfig
from .models import SecurityConfig as SecurityConfig
from .models import ShutdownConfig as ShutdownConfig
from .models import UploadConfig as UploadConfig
from .models import WorkspaceConfig as WorkspaceConfig
from .problems import ConfigError
from .problems import FieldProblem as FieldProblem
from .values import NODE_ID_RE as NODE_ID_RE
from .values import AbsPath as AbsPath
from .values import Duration as Duration
from .values import Ed25519KeyB64 as Ed25519KeyB64
from .values import NodeId as NodeId
from .values import NonEmptyStr as NonEmptyStr
from .values import Secret as Secret
from .values import Sha256Hex as Sha256Hex
from .values import TlsVerify as TlsVerify
from .values import parse_duration, split_host_port
from .yaml_file import read_yaml_file

__all__ = [
    "ConfigError",
    "MinerConfig",
    "load_config",
    "parse_duration",
    "read_yaml_file",
    "redacted_dump",
    "split_host_port",
]
