"""deploy/: the KubeRay RayJob and the `ray up` cluster YAML are well formed, and the kdsweep
commands they run parse with kdsweep's own CLI (and their sweep validates)."""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from orchestrator.cli import build_parser
from orchestrator.plan.config import parse_overrides

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def parses(command: str):
    argv = shlex.split(command)
    assert argv[0] == "kdsweep"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.address == "auto" and args.tracking_uri.startswith("http")
    overrides = parse_overrides(args.overrides)
    assert overrides["storage"].startswith("s3://")
    return args


def test_rayjob_manifest(tmp_path):
    config_map, job = yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert all(g["template"]["spec"]["containers"][0]["image"] and g["groupName"] for g in cluster["workerGroupSpecs"])
    args = parses(spec["entrypoint"])
    # the sweep the job mounts (ConfigMap -> /config) validates as kdsweep would read it
    from orchestrator.plan.config import load_config

    assert config_map["kind"] == "ConfigMap" and args.config == "/config/sweep.yaml"
    (tmp_path / "sweep.yaml").write_text(config_map["data"]["sweep.yaml"])
    cfg = load_config(tmp_path / "sweep.yaml", args.overrides)
    assert cfg.storage == "s3://my-bucket/kdsweep" and cfg.resources.gpus_per_trial == 0.5
    mounts = {m["mountPath"] for m in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/config" in mounts


def test_ray_up_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (DEPLOY / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    validate_config(prepare_config(config))  # as `ray up` does: the provider's defaults, then Ray's schema (ray-schema.json)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in c and "kdsweep" in c for c in config["setup_commands"])
    (run,) = [line.split("# run:", 1)[1].strip() for line in text.splitlines() if line.startswith("# run:")]
    args = parses(run)
    assert Path(args.config).name in {p.name for p in (DEPLOY.parent / "search_spaces").glob("*.yaml")}
