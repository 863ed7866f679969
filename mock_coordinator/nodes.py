"""Node and token bookkeeping for the mock: registration, bearer-token auth, admin status,
heartbeats, call history and protocol violations. Pure: no I/O; callers pass the time."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from .common import NODE_STATUSES, ApiError, rfc3339


@dataclasses.dataclass
class Node:
    node_id: str
    status: str = "active"  # admin status: active | pending | disabled | banned
    registrations: int = 0
    deregistered: bool = False
    deregistered_at: float | None = None
    first_registered_at: float | None = None
    last_registered_at: float | None = None
    token_expires_at: float | None = None
    descriptor: dict[str, Any] | None = None
    heartbeats: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    violations: int = 0
    violation_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def effective_status(self) -> str:
        return "deregistered" if self.deregistered else self.status

    def violation(self, kind: str, detail: str, now: float) -> None:
        """Count something a correct miner never does (tests assert violations == 0)."""
        self.violations += 1
        self.violation_log.append({"ts": now, "kind": kind, "detail": detail})

    def summary(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "status": self.effective_status,
            "admin_status": self.status,
            "registrations": self.registrations,
            "deregistered": self.deregistered,
            "violations": self.violations,
            "heartbeat_count": len(self.heartbeats),
            "last_heartbeat_at": self.heartbeats[-1]["ts"] if self.heartbeats else None,
        }

    def describe(self) -> dict[str, Any]:
        expires = self.token_expires_at
        return {
            **self.summary(),
            "deregistered_at": self.deregistered_at,
            "first_registered_at": self.first_registered_at,
            "last_registered_at": self.last_registered_at,
            "token_expires_at": rfc3339(expires) if expires is not None else None,
            "descriptor": self.descriptor,
            "heartbeats": self.heartbeats,
            "calls": self.calls,
            "violation_log": self.violation_log,
        }


class NodeBook:
    """All nodes and issued tokens. Re-registering issues a new token; earlier,
    unexpired tokens stay valid until revoked via admin."""

    def __init__(self, token_ttl_s: float, pending_by_default: bool) -> None:
        self.token_ttl_s = token_ttl_s
        self.pending_by_default = pending_by_default
        self.nodes: dict[str, Node] = {}
        self.tokens: dict[str, dict[str, Any]] = {}

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def ensure(self, node_id: str) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            node = Node(node_id, status="pending" if self.pending_by_default else "active")
            self.nodes[node_id] = node
        return node

    def register(self, node_id: str, descriptor: dict[str, Any], now: float) -> tuple[Node, str]:
        node = self.ensure(node_id)
        node.descriptor = descriptor
        if node.status == "banned":
            raise ApiError(403, "node banned")
        token = "nt-" + secrets.token_urlsafe(24)
        node.registrations += 1
        node.deregistered = False
        node.first_registered_at = node.first_registered_at or now
        node.last_registered_at = now
        node.token_expires_at = now + self.token_ttl_s
        self.tokens[token] = {
            "node_id": node_id,
            "expires_at": node.token_expires_at,
            "revoked": False,
            "issued_at": now,
        }
        return node, token

    def authenticate(self, token: str | None, now: float) -> Node:
        record = self.tokens.get(token) if token else None
        if record is None:
            raise ApiError(401, "missing or unknown bearer token")
        if record["revoked"]:
            raise ApiError(401, "token revoked")
        if record["expires_at"] <= now:
            raise ApiError(401, "token expired")
        return self.nodes[record["node_id"]]

    def set_status(self, node_id: str, status: str) -> Node:
        if status not in NODE_STATUSES:
            raise ApiError(400, f"status must be one of {list(NODE_STATUSES)}")
        node = self.ensure(node_id)
        node.status = status
        return node

    def revoke(self, node_id: str) -> int:
        """Revoke every token issued to the node so far; return how many."""
        count = 0
        for record in self.tokens.values():
            if record["node_id"] == node_id and not record["revoked"]:
                record["revoked"] = True
                count += 1
        return count

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [dataclasses.asdict(n) for n in self.nodes.values()],
            "tokens": self.tokens,
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.nodes = {n["node_id"]: Node(**n) for n in data.get("nodes", [])}
        self.tokens = dict(data.get("tokens", {}))
