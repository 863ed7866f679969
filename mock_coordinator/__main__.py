"""Command line of the mock coordinator: parse options, run the trio server, exit 0 on
SIGINT/SIGTERM. `python -m mock_coordinator --help` lists the options."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from .common import MiB, Options
from .server import serve


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="mock_coordinator", description="Mock AITBC coordinator (PROTOCOL.md v1)."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--state-file", type=Path, help="persist all state here (JSON)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="artifacts, uploads and files (default: STATE_FILE.d, else a temp dir)",
    )
    p.add_argument(
        "--bootstrap-token", default=os.environ.get("MOCK_BOOTSTRAP_TOKEN", "dev-bootstrap-token")
    )
    p.add_argument("--ready-file", type=Path, help="write the ready JSON here (atomically)")
    p.add_argument(
        "--signing-key-file",
        type=Path,
        help="Ed25519 key (PEM or raw 32 bytes); created 0600 if absent",
    )
    p.add_argument("--hmac-secret", help="enables sign mode 'hmac' (key_id mock-hmac)")
    p.add_argument("--lease-s", type=_positive(float), default=30.0)
    p.add_argument("--token-ttl-s", type=_positive(float), default=3600.0)
    p.add_argument(
        "--pending-by-default", action="store_true", help="new nodes register as 'pending'"
    )
    p.add_argument(
        "--heartbeat-interval-s",
        type=_positive(float),
        help="sent as heartbeat_interval_s in register answers",
    )
    p.add_argument("--max-attempts", type=_positive(int), default=5)
    p.add_argument(
        "--chunk-size",
        type=_positive(int),
        default=4 * MiB,
        help="upload chunk size offered to miners (bytes)",
    )
    p.add_argument("--seed", type=int, help="seed of the fault-injection RNG")
    p.add_argument(
        "--log-requests", action="store_true", help="one JSON line per API request on stderr"
    )
    p.add_argument(
        "--key-id",
        default="mock-ed25519",
        help="key_id of the Ed25519 signing key (for key rotation tests)",
    )
    p.add_argument("--certfile", type=Path, help="serve https: certificate chain (PEM)")
    p.add_argument("--keyfile", type=Path, help="serve https: private key (PEM)")
    a = p.parse_args(argv)
    if (a.certfile is None) != (a.keyfile is None):
        p.error("--certfile and --keyfile go together")
    return Options(
        host=a.host,
        port=a.port,
        state_file=a.state_file,
        data_dir=a.data_dir,
        bootstrap_token=a.bootstrap_token,
        ready_file=a.ready_file,
        signing_key_file=a.signing_key_file,
        hmac_secret=a.hmac_secret,
        lease_s=a.lease_s,
        token_ttl_s=a.token_ttl_s,
        pending_by_default=a.pending_by_default,
        heartbeat_interval_s=a.heartbeat_interval_s,
        max_attempts=a.max_attempts,
        chunk_size=a.chunk_size,
        seed=a.seed,
        log_requests=a.log_requests,
        key_id=a.key_id,
        certfile=a.certfile,
        keyfile=a.keyfile,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)

    def announce(line: str) -> None:
        print(line, flush=True)

    try:
        trio.run(serve, opts, announce)
    except KeyboardInterrupt:  # a second Ctrl-C before the handler is installed
        return 0
    except (OSError, ValueError) as exc:
        print(f"mock_coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
