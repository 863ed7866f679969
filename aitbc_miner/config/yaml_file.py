"""Config YAML: read one YAML file strictly (duplicate keys refused), for config and allowlists.

For: :func:`read_yaml_file`, which turns every failure into ``ConfigError(["PATH: reason"])``.
I/O: reads the one file it is given. Must not: echo the parser's snippet of the file,
which could hold a secret.
"""

import os
from pathlib import Path
from typing import Any

import yaml

from .problems import ConfigError
from .values import _short


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys: a silent override hides typos."""


def _construct_unique_mapping(
    loader: _StrictYamlLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {_short(key)}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    """Parse one YAML file (duplicate keys refused); ConfigError(["PATH: reason"]) on failure."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # Only the problem text: the parser's snippet could echo a secret from the file.
        reason = exc.problem or exc.context
        raise ConfigError([f"{path}: YAML syntax error{where}: {reason}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error ({type(exc).__name__})"]) from None
