"""Job input downloads end to end: the mock's /files on 127.0.0.1 (loopback stays
allowed), and destinations the input policy refuses, literally or via a redirect
served by a loopback server. A refused input is E_INPUT and the job never runs."""

from __future__ import annotations

import hashlib

import pytest

from tests.security._e2e import last_fail, marker_job, markers, wait_final
from tests.support.httpserver import CannedServer


@pytest.fixture
def redirector():
    server = CannedServer()
    yield server
    server.close()


def url_job(job_id: str, url: str, **spec: object) -> dict:
    artifacts = [{"path": f"ran-{job_id}"}]
    return marker_job(
        job_id, input={"urls": [{"url": url, "path": "in.bin", **spec}]}, artifacts=artifacts
    )


def test_inputs_from_loopback_are_fetched_and_checked(mock, miner):
    data = b"0123456789" * 1000
    url = mock.admin.add_file("in/ok.bin", data)["url"]
    big = mock.admin.add_file("in/big.bin", b"x" * (2 * 1024 * 1024 + 1))["url"]
    good_sha = hashlib.sha256(data).hexdigest()
    mock.admin.enqueue(url_job("in-ok", url, sha256=good_sha), retry=False)
    mock.admin.enqueue(url_job("in-sha", url, sha256="0" * 64), retry=False)
    mock.admin.enqueue(url_job("in-big", big, max_mb=2), retry=False)
    assert wait_final(mock, "in-ok")["state"] == "succeeded"
    assert (miner.workspace / "in-ok" / "input" / "in.bin").read_bytes() == data
    for job_id, reason in (("in-sha", "sha256 mismatch"), ("in-big", "larger than 2 MiB")):
        fail = last_fail(wait_final(mock, job_id))
        assert fail["error_code"] == "E_INPUT" and reason in fail["error_msg"], fail
    assert [p.name for p in markers(miner.workspace)] == ["ran-in-ok"]
    downloads = mock.admin.stats()["downloads"]
    assert downloads["in/ok.bin"]["with_auth"] == 0  # the node token never goes to inputs


def test_refused_destinations_are_e_input_and_never_run(mock, miner, redirector):
    redirector.routes["/to-file"] = (302, {"Location": "file:///etc/passwd"}, b"")
    redirector.routes["/to-metadata"] = (
        301, {"Location": "http://169.254.169.254/latest/meta-data/iam/"}, b"")  # fmt: skip
    redirector.routes["/to-v6-metadata"] = (
        307, {"Location": "http://[fd00:ec2::254]/latest/meta-data/"}, b"")  # fmt: skip
    cases = {
        "in-meta": ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        "in-meta-dec": ("http://2852039166/latest/meta-data/", "169.254.169.254"),
        "in-ll6": ("http://[fe80::1]:8080/x", "fe80::1"),
        "in-redir-file": (f"{redirector.base}/to-file", "'file' is not http(s)"),
        "in-redir-meta": (f"{redirector.base}/to-metadata", "169.254.169.254"),
        "in-redir-v6": (f"{redirector.base}/to-v6-metadata", "fd00:ec2::254"),
    }
    for job_id, (url, _) in cases.items():
        mock.admin.enqueue(url_job(job_id, url), retry=False)
    for job_id, (_, reason) in cases.items():
        fail = last_fail(wait_final(mock, job_id, timeout=20))
        assert fail["error_code"] == "E_INPUT", fail
        assert reason in fail["error_msg"], fail["error_msg"]
        assert fail["retryable"] is False
    assert markers(miner.workspace) == []
    hops = sorted(path for path, _ in redirector.requests)
    assert hops == ["/to-file", "/to-metadata", "/to-v6-metadata"]
