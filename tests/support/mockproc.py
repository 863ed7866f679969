"""Start the bundled mock coordinator as a real process and drive its /admin API
synchronously. Used by every integration test; no pytest fixtures live here."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from tests.support.procs import kill_process, stop_process
from tests.support.wait import wait_for


class Admin:
    """Thin httpx.Client wrapper over /admin; every call raises on a non-2xx answer."""

    def __init__(
        self, admin_url: str, timeout: float = 10.0, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.client = httpx.Client(base_url=admin_url, timeout=timeout, verify=verify)

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        if response.is_error:
            raise httpx.HTTPStatusError(
                f"{method} {path} -> {response.status_code}: {response.text}",
                request=response.request,
                response=response,
            )
        return response

    def enqueue(self, job: dict[str, Any], **opts: Any) -> str:
        return self._call("POST", "/jobs", json={"job": job, **opts}).json()["id"]

    def enqueue_many(self, jobs: list[dict[str, Any]], **opts: Any) -> list[str]:
        return self._call("POST", "/jobs", json={"jobs": jobs, **opts}).json()["ids"]

    def job(self, id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{quote(id, safe='/')}").json()

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else None
        return self._call("GET", "/jobs", params=params).json()

    def node(self, node_id: str) -> dict[str, Any]:
        return self._call("GET", f"/nodes/{quote(node_id, safe='')}").json()

    def nodes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/nodes").json()

    def set_node_status(self, node_id: str, status: str) -> dict[str, Any]:
        return self._call("POST", f"/nodes/{node_id}/status", json={"status": status}).json()

    def revoke(self, node_id: str) -> dict[str, Any]:
        return self._call("POST", f"/nodes/{node_id}/revoke").json()

    def cancel(self, id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{quote(id, safe='/')}/cancel").json()

    def fault(self, **spec: Any) -> dict[str, Any]:
        return self._call("POST", "/faults", json=spec).json()

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "/faults").json()["faults"]

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def add_file(self, name: str, data: bytes, **opts: Any) -> dict[str, Any]:
        body = {"name": name, "content_b64": base64.b64encode(data).decode(), **opts}
        return self._call("POST", "/files", json=body).json()

    def artifact(self, id: str, path: str) -> bytes:
        return self._call("GET", f"/jobs/{quote(id, safe='/')}/artifacts/{quote(path)}").content

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats").json()

    def upload(self, upload_id: str) -> dict[str, Any]:
        return self._call("GET", f"/uploads/{upload_id}").json()

    def uploads(self) -> list[dict[str, Any]]:
        return self._call("GET", "/uploads").json()


class MockCoordinator:
    """A running mock process and what it announced when it became ready."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        ready: dict[str, Any],
        log_paths: tuple[Path, Path],
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.proc = proc
        self.ready = ready
        self.url: str = ready["url"]
        self.admin_url: str = ready["admin_url"]
        self.base: str = self.url.removesuffix("/api/v1")
        self.port: int = httpx.URL(self.base).port or 80
        self.key_id: str = ready["key_id"]
        self.public_key: str = ready["public_key"]
        self.hmac_key_id: str | None = ready.get("hmac_key_id")
        self.pid: int = ready["pid"]
        self.stdout_path, self.stderr_path = log_paths
        self.admin = Admin(self.admin_url, verify=verify)

    def logs(self) -> str:
        return "".join(
            p.read_text(errors="replace")
            for p in (self.stdout_path, self.stderr_path)
            if p.exists()
        )

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        self.admin.close()
        return stop_process(self.proc, timeout)

    def kill(self) -> None:
        self.admin.close()
        kill_process(self.proc)

    def __enter__(self) -> MockCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_flag(args: tuple[str, ...], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def start_mock(
    tmp_path: Path,
    *extra_args: str,
    port: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 15,
    verify: ssl.SSLContext | bool = True,
) -> MockCoordinator:
    """Start `python -m mock_coordinator` on 127.0.0.1 and wait until it is ready.

    Data lives in tmp_path/"mock-data" unless extra_args name --data-dir, so a restart
    in the same tmp_path finds its artifacts again. Logs go to tmp_path/mock-N.{out,err}.
    `verify` is what the admin client trusts (a CA context when the mock serves https).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    n = 1
    while (tmp_path / f"mock-{n}.out").exists():
        n += 1
    stdout_path, stderr_path = tmp_path / f"mock-{n}.out", tmp_path / f"mock-{n}.err"
    ready_file = tmp_path / f"mock-{n}.ready.json"
    args = [sys.executable, "-m", "mock_coordinator", "--host", "127.0.0.1", "--port", str(port)]
    if not _has_flag(extra_args, "--ready-file"):
        args += ["--ready-file", str(ready_file)]
    else:
        ready_file = Path(extra_args[extra_args.index("--ready-file") + 1])
        ready_file.unlink(missing_ok=True)
    if not _has_flag(extra_args, "--data-dir"):
        args += ["--data-dir", str(tmp_path / "mock-data")]
    args += list(extra_args)
    full_env = {**os.environ, **(env or {})}
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            args, stdout=out, stderr=err, env=full_env, stdin=subprocess.DEVNULL
        )

    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            tail = (
                stdout_path.read_text(errors="replace") + stderr_path.read_text(errors="replace")
            )[-4000:]
            raise RuntimeError(f"mock coordinator exited with {proc.returncode}:\n{tail}")
        if not ready_file.exists():
            return None
        return json.loads(ready_file.read_text())

    try:
        info = _wait_ready(ready, timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return MockCoordinator(proc, info, (stdout_path, stderr_path), verify=verify)


def _wait_ready(ready: Any, timeout: float) -> dict[str, Any]:
    died: list[RuntimeError] = []

    def check() -> dict[str, Any] | None:
        try:
            return ready()
        except RuntimeError as exc:
            died.append(exc)
            return {"died": True}

    info = wait_for(check, timeout=timeout, what="mock coordinator ready file")
    if died:
        raise died[0]
    return info
