"""Can the cluster ever run one trial? Checked before anything is written, never left to hang.

A trial is `num_workers` Ray Train workers of {CPU: cpus_per_trial, GPU: gpus_per_trial} each.
On a local Ray the machine is the only node; with --address the live nodes are read from Ray,
waiting up to `resources.placement_timeout_s` (and asking the autoscaler) for nodes to join.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time

from ray.tune import Callback

from orchestrator.plan.config import Resources
from trainables.registry import ConfigError

log = logging.getLogger(__name__)


def worker_slots(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many workers of {CPU: cpus, GPU: gpus} the nodes can hold at once."""
    def per_node(n: dict[str, float]) -> int:
        fit = math.floor(n.get("CPU", 0.0) / cpus + 1e-9)
        return min(fit, math.floor(n.get("GPU", 0.0) / gpus + 1e-9)) if gpus else fit

    return sum(per_node(n) for n in nodes)


def shortfall(r: Resources, nodes: list[dict[str, float]], where: str) -> str | None:
    """None when one trial fits; else the one-line reason, naming the field and the fix."""
    if r.gpus_per_trial and not any(n.get("GPU", 0) >= r.gpus_per_trial for n in nodes):
        has = max((n.get("GPU", 0) for n in nodes), default=0)
        return (f"`resources.gpus_per_trial` asks for {r.gpus_per_trial:g} GPU per worker, but {where} has "
                f"{'no GPU' if not has else f'at most {has:g} per node'}: set resources.gpus_per_trial: 0 (CPU) or join a cluster with GPUs (--address)")
    if not any(n.get("CPU", 0) >= r.cpus_per_trial for n in nodes):
        most = max((n.get("CPU", 0) for n in nodes), default=0)
        return (f"`resources.cpus_per_trial` asks for {r.cpus_per_trial:g} CPUs per worker, but {where} has at most "
                f"{most:g} per node: set resources.cpus_per_trial <= {most:g}")
    slots = worker_slots(nodes, r.cpus_per_trial, r.gpus_per_trial)
    if slots < r.num_workers:
        return (f"`resources.num_workers` asks for {r.num_workers} workers of {r.cpus_per_trial:g} CPU / {r.gpus_per_trial:g} GPU, "
                f"but {where} holds {slots}: lower resources.num_workers or the per-worker resources")
    return None


def ray_address(address: str | None) -> str | None:
    """The cluster a sweep joins: `--address`, else RAY_ADDRESS (set by `ray job submit`), else None:
    a local Ray of the sweep's own. `local` says the same. Never the cluster Ray's own lookup would
    find in its temp dir: that is the last `ray start` on this machine, possibly long dead."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_reachable(address: str, timeout_s: float) -> None:
    """A `--address` whose head does not answer is one line (exit 2) within `timeout_s`, before
    Ray starts: ray.init would retry it for minutes, printing connection warnings. `auto` (Ray's
    own lookup of a running cluster) is left to Ray, which fails fast when it finds none."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"`--address` must be HOST:PORT, ray://HOST:PORT or auto, but got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        given = "RAY_ADDRESS (the default `--address`)" if os.environ.get("RAY_ADDRESS") == address else "`--address`"
        raise ConfigError(f"{given} {address} cannot be reached ({why} within {timeout_s:g} s): start the cluster "
                          "(`ray start --head`) or fix the address; resources.connect_timeout_s sets the wait") from None


def local_nodes() -> list[dict[str, float]]:
    """This machine as a local Ray sees it (Ray's defaults: every core, every visible GPU)."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_local(r: Resources) -> None:
    if (reason := shortfall(r, local_nodes(), "this machine")) is not None:
        raise ConfigError(reason)


def wait_for_cluster(r: Resources, address: str) -> None:
    """Connected to `address`: wait (bounded) until one trial fits, asking the autoscaler for it."""
    from ray.autoscaler.sdk import request_resources

    deadline = time.monotonic() + r.placement_timeout_s
    reason = shortfall(r, cluster_nodes(), f"the cluster at {address}")
    if reason is None:
        return
    bundle = {"CPU": r.cpus_per_trial, **({"GPU": r.gpus_per_trial} if r.gpus_per_trial else {})}
    request_resources(bundles=[bundle] * r.num_workers)
    log.info("waiting up to %.0f s for nodes that can hold a trial: %s", r.placement_timeout_s, reason)
    try:
        while (reason := shortfall(r, cluster_nodes(), f"the cluster at {address}")) is not None:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{reason} (waited {r.placement_timeout_s:g} s: raise resources.placement_timeout_s for an autoscaling cluster)")
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])


class PlacementGroupReaper(Callback):
    """Tune callback: removes Ray Train worker-group placement groups that outlived their trial.

    When ASHA stops a trial, Tune kills its actor and with it the Train controller; the worker
    group's placement group is meant to go with them, but it sometimes stays CREATED with no actor
    in it (seen with Ray 2.60: a leaked 1-CPU group starved the next 2-worker trial until its
    worker-group start timed out; a killed driver's groups outlived its job too). Every `every_s`
    seconds, and when a trial ends, a placement group of this job or of an ended job that holds CPU
    or GPU bundles, is older than `grace_s` and has no live or pending actor in it is removed.
    Other live jobs' groups and Tune's per-trial groups (the trial actor's token bundle) are left alone."""

    def __init__(self, every_s: float = 10.0, grace_s: float = 30.0) -> None:
        self.every_s, self.grace_s = every_s, grace_s
        self._last = 0.0

    def __getstate__(self):  # pickled into Tune's state; nothing worth keeping
        return {"every_s": self.every_s, "grace_s": self.grace_s, "_last": 0.0}

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self.reap()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.reap()

    def reap(self) -> list[str]:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        from ray.util.state import list_actors, list_placement_groups

        self._last = time.monotonic()
        try:
            import ray._private.state

            job = ray.get_runtime_context().get_job_id()
            live_jobs = {j["JobID"] for j in ray._private.state.jobs() if not j["IsDead"]} - {job}
            groups = list_placement_groups(detail=True, filters=[("state", "=", "CREATED")], raise_on_missing_output=False)
            used = {a.placement_group_id for a in list_actors(filters=[("state", "!=", "DEAD")], detail=True, limit=10_000,
                                                                raise_on_missing_output=False)}
        except Exception as e:  # the state API is best effort (dashboard restarting, old cluster)
            log.debug("placement-group check skipped: %s", e)
            return []
        now_ns = time.time_ns()
        removed = []
        for pg in groups:
            compute = any(k in ("CPU", "GPU") for b in pg.bundles for k in b.get("unit_resources", {}))
            age_s = (now_ns - int((pg.stats or {}).get("creation_request_received_ns", now_ns))) / 1e9
            if pg.creator_job_id in live_jobs or pg.is_detached or not compute or pg.placement_group_id in used or age_s < self.grace_s:
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg.placement_group_id))))
            removed.append(pg.placement_group_id)
        if removed:
            log.info("removed %d placement group(s) left behind by ended trials: %s", len(removed), ", ".join(p[:8] for p in removed))
        return removed
