"""Build and configure the fake C NVML, `fake_nvml.c` (tests only).

The pure-Python fake (`tests/support/fake_nvml.py`) replaces the pynvml module;
this one replaces the driver's `libnvidia-ml.so.1` under the real pynvml, so
pynvml's ctypes bindings (symbol names, versioned structs, error classes,
bytes/str decoding) run too. The inventory is a line-based file named by
$AITBC_FAKE_NVML_CONFIG (format: the comment at the top of fake_nvml.c);
`config_text` writes one from a `fake_nvml` scenario dict, so both fakes can
play the same scenarios. `build(..., legacy=True)` gives a pre-R510 driver's
library (no nvmlDeviceGetComputeRunningProcesses_v3, only ..._v2).

pynvml loads the library with `CDLL("libnvidia-ml.so.1")`: a subprocess finds
the shim through `LD_LIBRARY_PATH=<shim dir>` (`env`). In-process tests give
pynvml the already loaded shim instead (see tests/integration/test_gpu_real_pynvml.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBNAME = "libnvidia-ml.so.1"
CONFIG_ENV = "AITBC_FAKE_NVML_CONFIG"
TRACE_ENV = "AITBC_FAKE_NVML_TRACE"

# fake_nvml's error names -> the shim's (NVML_ERROR_* without the prefix).
_ERRORS = {
    "library_not_found": "LIBRARY_NOT_FOUND",
    "driver_not_loaded": "DRIVER_NOT_LOADED",
    "gpu_lost": "GPU_IS_LOST",
    "no_permission": "NO_PERMISSION",
    "unknown": "UNKNOWN",
}


def compiler() -> str | None:
    """$CC, else cc, gcc or clang on PATH; None when there is no C compiler."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def build(out_dir: Path, *, legacy: bool = False) -> Path:
    """Compile the shim (once per source and variant) into out_dir/<hash>/libnvidia-ml.so.1.

    `legacy`: the pre-R510 variant (-DAITBC_NO_V3), which exports
    nvmlDeviceGetComputeRunningProcesses_v2 but not ..._v3, as an R470 driver does;
    the default one exports both, as R510 and later do.
    """
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) to build the fake NVML")
    flags = ["-shared", "-fPIC", "-O2", "-pthread", "-Wall"]
    if legacy:
        flags.append("-DAITBC_NO_V3")
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(flags).encode()).hexdigest()[:16]
    lib = out_dir / key / LIBNAME
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f".{LIBNAME}.{os.getpid()}")
        result = subprocess.run(
            [cc, *flags, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr}")
        os.replace(tmp, lib)
    return lib


def config_text(scenario: Mapping[str, Any]) -> str:
    """The shim's config for a `tests.support.fake_nvml` scenario dict.

    Extra keys the Python fake does not know: per GPU "query_error" (handle
    lookups work, every other call fails), "processes_error" (only the compute
    process listing fails), "mig_pending" and "pci_device_id";
    a process "used_mb" of None is NVML_VALUE_NOT_AVAILABLE. A process not
    `sticky` is listed while its pid is alive, as in the Python fake.
    """
    lines = ["# written by tests/support/nvml_shim.config_text"]
    for key in ("init_error", "system_error"):
        if scenario.get(key):
            lines.append(f"{key} {_ERRORS[scenario[key]]}")
    lines.append(f"driver {scenario.get('driver', '550.54.15')}")
    lines.append(f"cuda {int(scenario.get('cuda', 12040))}")
    lines += [f"topology {a} {b} {level}" for a, b, level in scenario.get("topology", [])]
    for spec in scenario.get("gpus", []):
        if spec.get("pid_files"):
            raise ValueError("pid_files are a feature of the Python fake only")
        lines += [
            "gpu",
            f"uuid {spec['uuid']}",
            f"name {spec.get('name', 'NVIDIA Fake')}",
            f"total_mb {int(spec['total_mb'])}",
            f"used_mb {int(spec.get('used_mb', 0))}",
            f"util {int(spec.get('util', 0))}",
            f"temp {'none' if spec.get('temp') is None else int(spec['temp'])}",
            f"pci {spec.get('pci', '00000000:00:00.0')}",
            f"pci_device_id {int(spec.get('pci_device_id', 0x233010DE))}",
        ]
        if spec.get("numa") is not None:
            lines.append(f"numa {int(spec['numa'])}")
        mig = spec.get("mig", False)
        if mig is None:
            lines.append("mig none")
        else:
            lines.append(f"mig {int(mig)} {int(spec.get('mig_pending', mig))}")
        for key in ("error", "query_error", "processes_error"):
            if spec.get(key):
                lines.append(f"{key} {_ERRORS[spec[key]]}")
        for p in spec.get("processes", []):
            used = "na" if p.get("used_mb", 0) is None else int(p.get("used_mb", 0))
            kind = "process" if p.get("sticky") else "process_live"
            lines.append(f"{kind} {int(p['pid'])} {used}")
    return "\n".join(lines) + "\n"


def write_config(path: Path, scenario: Mapping[str, Any] | str) -> None:
    """Replace the config atomically (the shim re-reads it when its inode changes)."""
    text = scenario if isinstance(scenario, str) else config_text(scenario)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def env(lib: Path, config: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess whose pynvml should load the shim with `config`."""
    out = dict(os.environ if base is None else base)
    prior = out.get("LD_LIBRARY_PATH")
    out["LD_LIBRARY_PATH"] = f"{lib.parent}:{prior}" if prior else str(lib.parent)
    out[CONFIG_ENV] = str(config)
    return out
