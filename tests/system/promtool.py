"""Find Prometheus' `promtool` for the metrics lint tests, fetching it once if needed.

Order: $PROMTOOL, `promtool` on PATH, the cached copy, else Debian's
`prometheus` package fetched with `apt-get download` and unpacked with
`dpkg-deb -x` into the cache (only the binary is kept; nothing is installed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def _cache_dir() -> Path:
    explicit = os.environ.get("AITBC_TOOLS_CACHE")
    if explicit:
        return Path(explicit)
    shared = Path("/var/tmp/aitbc-miner-tools")
    if os.access("/var/tmp", os.W_OK) and (not shared.exists() or os.access(shared, os.W_OK)):
        return shared
    return Path.home() / ".cache" / "aitbc-miner-tools"


def find_promtool() -> tuple[Path | None, str]:
    """(path, "") when promtool is usable, else (None, why not)."""
    explicit = os.environ.get("PROMTOOL")
    if explicit:
        return (Path(explicit), "") if os.access(explicit, os.X_OK) else (None, f"{explicit}?")
    on_path = shutil.which("promtool")
    if on_path:
        return Path(on_path), ""
    cache = _cache_dir()
    cached = cache / "promtool"
    if os.access(cached, os.X_OK):
        return cached, ""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None, "promtool not on PATH and no apt-get/dpkg-deb to fetch Debian's prometheus"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = subprocess.run(
            ["apt-get", "download", "-q", "prometheus"],
            cwd=tmp, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if r.returncode != 0 or not debs:
            why = (r.stderr or r.stdout).strip()[-300:]
            return None, f"apt-get download prometheus failed ({why}); install promtool"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/x"], check=True, timeout=300)
        binary = Path(tmp) / "x/usr/bin/promtool"
        if not binary.exists():
            return None, "the prometheus package has no usr/bin/promtool"
        os.replace(binary, cached)  # same filesystem: atomic, concurrent runs agree
    return cached, ""


def check_metrics(promtool: Path, text: bytes) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` over an exposition; exit 0 = clean (no lint problems)."""
    return subprocess.run(
        [str(promtool), "check", "metrics"],
        input=text.decode(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
