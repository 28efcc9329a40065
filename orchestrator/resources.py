"""Can the cluster ever run one trial? Checked before anything is written, never left to hang.

A trial is `num_workers` Ray Train workers of {CPU: cpus_per_trial, GPU: gpus_per_trial} each.
On a local Ray the machine is the only node; with --address the live nodes are read from Ray,
waiting up to `resources.placement_timeout_s` (and asking the autoscaler) for nodes to join.
"""
from __future__ import annotations

import logging
import math
import os
import time

from orchestrator.config import Resources
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
