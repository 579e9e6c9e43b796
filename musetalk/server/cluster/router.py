"""Ray Serve request router that pins every session to one replica (the policy is `routing.SessionTable`).

Configured on the replica deployment (`request_router_config`); it runs inside each process that holds a
handle to that deployment — the gateway replicas. A request's session is Ray Serve's own per-request
session id (`handle.options(session_id=...)`), which the gateway sets. The replicas' reports
(`record_routing_stats`: owned and live sessions, pid, node, device) reach the router with Ray Serve's
replica updates; the gateway's `/health` lists them from `routing.REPORTS`.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from musetalk.server.cluster import routing
from musetalk.server.cluster.routing import ReplicaLoad, SessionTable

# Ray Serve ships this module's classes to the routers by value (a copy of the module), so anything shared
# with the rest of the process (the replica reports) lives in `routing`, reached through the module.


class SessionAffinityRouter(RequestRouter):
    """Every request of a session goes to the replica that owns the session; new sessions to the least loaded."""

    def initialize_state(self, **kwargs: Any) -> None:
        """`idle_s`: how long a pinned session without requests still counts as live for load balancing."""
        self._table = SessionTable(idle_s=float(kwargs.get("idle_s", 300.0)))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray Serve's replica update (also carries their latest reports): keep the reports for /health."""
        super().update_replicas(replicas)
        routing.REPORTS.replace({r.replica_id.unique_id: dict(r.routing_stats or {}) for r in replicas})

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """The owner of the request's session, alone: a busy owner is waited for, never bypassed."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # retry the same owner with backoff
        session = pending_request.metadata.session_id if pending_request is not None else ""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [
            ReplicaLoad(
                rid,
                frozenset((r.routing_stats or {}).get("owned", ())),
                frozenset((r.routing_stats or {}).get("live", ())),
            )
            for rid, r in by_id.items()
        ]
        chosen = self._table.choose(session, loads, time.monotonic())
        return [[by_id[chosen]]] if chosen is not None else []
