"""Ray Serve custom autoscaling policy that carries out the controller's replica decisions.

Configure it on the deployment (Ray 2.60 reads only this key; a `policy: {name: ...}` key is silently ignored):

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      policy:
        policy_function: cluster.autoscaling:controller_policy

Each replica's `record_autoscaling_stats()` returns the replica count the controller asked for in its last
report reply (`desired_replicas`, 0 when the controller has not asked); Serve aggregates these per replica and
calls this function on its control loop. It never blocks on another actor.
"""

from __future__ import annotations

from typing import Any


def controller_policy(ctx) -> tuple[int, dict[str, Any]]:
    """(target replicas, policy state): the controller's latest wish within the deployment's bounds; without
    one, the current target stands. The state counts calls (tests check that the policy runs)."""
    wanted = [v for v in ((ctx.aggregated_metrics or {}).get("desired_replicas") or {}).values() if v and v > 0]
    target = int(round(max(wanted))) if wanted else ctx.target_num_replicas
    target = min(max(target, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
    state = dict(ctx.policy_state or {})
    state["calls"] = state.get("calls", 0) + 1
    state["last_wanted"] = max(wanted) if wanted else None
    return target, state
