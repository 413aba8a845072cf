"""The cluster/ manifests: schema-valid (KubeRay CRD types + Kubernetes core types, strict), secure by
default (token auth, non-root, no host network, dashboard inside the cluster), one Ray version everywhere, and
the role groups sized for the shipped cluster config. No Kubernetes or cloud access: everything is checked
offline.

Schemas: tests/data/kuberay/ (provenance in the files' headers); the cluster-launcher YAML is checked against
the schema that ships inside the installed ray package (ray/autoscaler/ray-schema.json)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DATA = REPO / "tests" / "data" / "kuberay"
CLUSTER_CONFIG = REPO / "configs" / "cluster" / "sd35m.yaml"
IMAGE_ROOT = "/home/ray/rtdmd-ray"  # where cluster/Dockerfile puts the repository

# worker group -> (config `resources` role, custom Ray resource, Ray node label value); None: no config role
# of its own (reward-cpu serves reward workers run with gpus_per_actor=0)
ROLE_GROUPS: dict[str, tuple[str | None, str, str]] = {
    "learner-gpu": ("learner", "rtdmd_learner", "learner"),
    "sampler-gpu": ("sampler", "rtdmd_sampler", "sampler"),
    "reward-gpu": ("reward_worker", "rtdmd_reward", "reward"),
    "reward-cpu": (None, "rtdmd_reward_cpu", "reward-cpu"),
}
LAUNCHER_NODE_TYPES = {
    "learner-gpu": "learner_gpu",
    "sampler-gpu": "sampler_gpu",
    "reward-gpu": "reward_gpu",
    "reward-cpu": "reward_cpu",
}


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    kuberay = yaml.safe_load((DATA / "kuberay_v1.schema.yaml").read_text())
    core = json.loads((DATA / "k8s_core_v1.schema.json").read_text())
    overlap = set(kuberay["$defs"]) & set(core["$defs"])
    assert not overlap, overlap
    kuberay["$defs"].update(core["$defs"])
    jsonschema.Draft202012Validator.check_schema(kuberay)
    return kuberay


def _errors(schema: dict[str, Any], kind: str, doc: dict[str, Any]) -> list[str]:
    root = {**schema, "$ref": f"#/$defs/{kind}"}
    v = jsonschema.Draft202012Validator(root)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return _load("raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load("rayjob.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return _load("rayservice.yaml")


def _ray_pin() -> str:
    m = re.search(r'"ray\[default,serve\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins ray[default,serve]==X"
    return m.group(1)


def _cluster_specs(raycluster: dict, rayjob: dict) -> list[tuple[str, dict]]:
    return [("raycluster.yaml", raycluster["spec"]), ("rayjob.yaml", rayjob["spec"]["rayClusterSpec"])]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _quantity(q: Any) -> float:
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def _custom_resources(params: dict[str, str]) -> dict[str, float]:
    """KubeRay's rayStartParams `resources` value, as `ray start --resources` receives it."""
    raw = params.get("resources")
    if raw is None:
        return {}
    # '"{\"name\": 1}"' in YAML: KubeRay pastes it after --resources=, so the shell strips the quotes
    (arg,) = shlex.split(raw)
    return json.loads(arg)


# ------------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize(
    "name,kind",
    [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"), ("rayservice.yaml", "RayService"),
     ("pvc.yaml", "PersistentVolumeClaim")],
)
def test_manifest_matches_crd_schema(schema, name, kind):
    assert _errors(schema, kind, _load(name)) == []


def _container(doc: dict, group: int) -> dict:
    return doc["spec"]["workerGroupSpecs"][group]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        # a misspelt field: the API server would prune it silently; the strict schema names it
        (lambda d: d["spec"]["headGroupSpec"].update(servicetype="ClusterIP"), "servicetype"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="1"), "'1' is not of type 'integer'"),
        (lambda d: d["spec"]["authOptions"].update(mode="on"), "'on' is not one of"),
        (lambda d: _container(d, 0).update(gpus=1), "gpus"),
        (lambda d: _container(d, 1)["resources"]["limits"].update(memory="lots"), "memory"),
        (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].pop("containers"), "'containers' is a"),
    ],
)
def test_schema_rejects_broken_manifests(schema, raycluster, mutate, expected):
    doc = copy.deepcopy(raycluster)
    mutate(doc)
    errors = _errors(schema, "RayCluster", doc)
    assert errors and any(expected in e for e in errors), errors


# ------------------------------------------------------------------------------------------ security


def test_token_auth_on_and_never_disabled(raycluster, rayjob):
    for name, spec in _cluster_specs(raycluster, rayjob):
        assert spec.get("authOptions", {}).get("mode") == "token", name
        # KubeRay's authOptions needs Ray >= 2.52
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
        for group, g in _groups(spec):
            for c in g["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token"), (name, group)
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert "RAY_AUTH_MODE" not in runtime_env.get("env_vars", {})


def test_pods_run_non_root_without_privileges_or_host_access(raycluster, rayjob):
    for name, spec in _cluster_specs(raycluster, rayjob):
        for group, g in _groups(spec):
            pod = g["template"]["spec"]
            where = f"{name}:{group}"
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000, where
            assert not any("hostPath" in v for v in pod.get("volumes", [])), where
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1000) == 1000, where
                assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged"), where
                assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
                assert not any("hostPort" in p for p in c.get("ports", [])), where


def test_dashboard_stays_inside_the_cluster(raycluster, rayjob):
    for name, spec in _cluster_specs(raycluster, rayjob):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress") and "ingressOptions" not in head, name
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
    # no other way out either: no Ingress, Route, LoadBalancer or NodePort Service in any shipped manifest
    for path in CLUSTER.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("kind") not in ("Ingress", "Route", "Gateway", "HTTPRoute"), path.name
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name


# ------------------------------------------------------------------------------------------ versions


def test_one_ray_version_everywhere(raycluster, rayjob):
    import ray

    pin = _ray_pin()
    assert ray.__version__ == pin
    (base,) = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    repo, tag = base.split(":")
    assert repo == "rayproject/ray" and tag == f"{pin}-py311-gpu", base
    images = {
        c["image"]
        for _, spec in _cluster_specs(raycluster, rayjob)
        for _, g in _groups(spec)
        for c in g["template"]["spec"]["containers"]
    }
    images.add(_load("cluster-launcher.yaml")["docker"]["image"])
    for name, spec in _cluster_specs(raycluster, rayjob):
        assert spec["rayVersion"] == pin, name
    # our image is tagged with the base image's tag, so the tag says which Ray it carries
    assert {i.rsplit(":", 1)[1] for i in images} == {tag}, images
    # python of the base image = the project's python
    assert "py311" in tag and 'requires-python = ">=3.11,<3.12"' in (REPO / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------------ roles and sizes


def test_rayjob_creates_the_same_cluster(raycluster, rayjob, rayservice):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    assert rayservice["spec"]["rayClusterConfig"] == raycluster["spec"]


# ------------------------------------------------------------------------------------------ reward serving


def test_rayservice_serves_the_cluster_configs_rewards(rayservice):
    """serveConfigV2 is a valid Serve config (Ray's own schema) whose application, built by its import path
    from the shipped cluster config, is one autoscaled deployment per training reward pinned to reward-gpu."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from rtdmd_ray.config import load_config

    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = dict(app.args)
    assert args["config"].startswith(IMAGE_ROOT + "/")
    args["config"] = str(REPO / args["config"][len(IMAGE_ROOT) + 1 :])
    cfg = load_config(args["config"])
    assert app.name == "rtdmd-rewards" and list(args["rewards"]) == list(cfg.rewards.weights)
    router = builder(args)._bound_deployment
    deployments = {k: v._bound_deployment for k, v in router.init_args[0].items()}
    assert sorted(deployments) == sorted(cfg.rewards.weights)
    for name, d in deployments.items():
        want = cfg.rewards.serve.for_reward(name)
        assert d.name == f"reward_{name}"
        assert d.ray_actor_options["num_gpus"] == want["gpus_per_replica"] > 0
        assert d.ray_actor_options["resources"] == dict(cfg.rewards.serve.custom) == {"rtdmd_reward": 1}
        auto = d._deployment_config.autoscaling_config
        assert (auto.min_replicas, auto.max_replicas) == (want["min_replicas"], want["max_replicas"])
    with pytest.raises(ValueError, match="need config"):
        builder({"confg": args["config"]})
    # one reward moved to the CPU reward pods: its own custom resource, no GPU; the others stay on reward-gpu
    cpu_clip = ["rewards.serve.custom_per_reward={clipscore: {rtdmd_reward_cpu: 1}}",
                "rewards.serve.per_reward={clipscore: {gpus_per_replica: 0}}"]
    router = builder({**args, "overrides": cpu_clip})._bound_deployment
    deployments = {k: v._bound_deployment for k, v in router.init_args[0].items()}
    assert deployments["clipscore"].ray_actor_options["resources"] == {"rtdmd_reward_cpu": 1.0}
    assert deployments["clipscore"].ray_actor_options["num_gpus"] == 0.0
    assert deployments["hpsv2"].ray_actor_options["resources"] == {"rtdmd_reward": 1.0}


def test_reward_replicas_fit_the_reward_group_and_its_autoscaling_range(raycluster):
    """The cluster config's reward deployments at min_replicas fit the reward-gpu pods that start with the
    cluster; at max_replicas they need more pods, which the in-tree autoscaler may add (up to maxReplicas)."""
    from rtdmd_ray.config import load_config

    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    cfg = load_config(CLUSTER_CONFIG)
    assert cfg.rewards.serving == "serve"
    groups = dict(_groups(spec)[1:])
    g = groups["reward-gpu"]
    params = g["rayStartParams"]
    gpus, cpus, slots = float(params["num-gpus"]), float(params["num-cpus"]), _custom_resources(params)
    demand = {"min_replicas": {"GPU": 0.0, "CPU": 0.0, "rtdmd_reward": 0.0},
              "max_replicas": {"GPU": 0.0, "CPU": 0.0, "rtdmd_reward": 0.0}}
    for name in cfg.rewards.weights:
        d = cfg.rewards.serve.for_reward(name)
        for k in demand:
            demand[k]["GPU"] += d[k] * d["gpus_per_replica"]
            demand[k]["CPU"] += d[k] * d["cpus_per_replica"]
            demand[k]["rtdmd_reward"] += d[k] * cfg.rewards.serve.custom["rtdmd_reward"]

    def pods_needed(need: dict[str, float]) -> float:
        return max(need["GPU"] / gpus, need["CPU"] / cpus, need["rtdmd_reward"] / slots["rtdmd_reward"])

    assert pods_needed(demand["min_replicas"]) <= g["replicas"]  # idle rewards fit the pods that start
    assert g["replicas"] < pods_needed(demand["max_replicas"]) <= g["maxReplicas"]  # growth adds pods
    # only the reward-gpu pods advertise the resource the replicas ask for
    holders = [n for n, (_, adv) in _pods(spec).items() if adv.get("rtdmd_reward", 0) > 0]
    assert holders == ["reward-gpu"]
    for name in ("learner-gpu", "sampler-gpu"):  # the autoscaler never takes a training pod away
        assert groups[name]["minReplicas"] == groups[name]["replicas"], name


def test_every_role_has_its_group_custom_resource_and_label(raycluster):
    from ray._private.label_utils import parse_node_labels_string, validate_node_labels

    spec = raycluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no Ray work on the head
    groups = dict(_groups(spec)[1:])
    assert set(groups) == set(ROLE_GROUPS)
    for name, (_, resource, label) in ROLE_GROUPS.items():
        g = groups[name]
        params = g["rayStartParams"]
        assert _custom_resources(params) == {resource: 8}, name
        labels = parse_node_labels_string(params["labels"])
        validate_node_labels(labels)
        assert labels == {"rtdmd-ray/role": label}
        assert g["template"]["metadata"]["labels"]["rtdmd-ray/role"] == label
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        # what Ray is told matches what Kubernetes grants the container
        (c,) = g["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        assert _quantity(params["num-cpus"]) == _quantity(limits["cpu"]), name
        assert _quantity(params["num-gpus"]) == _quantity(limits.get("nvidia.com/gpu", 0)), name


def test_cluster_config_fills_each_role_group_exactly(raycluster, rayjob):
    from rtdmd_ray.config import load_config

    cfg = load_config(CLUSTER_CONFIG)
    groups = dict(_groups(raycluster["spec"])[1:])
    for name, (role, resource, _) in ROLE_GROUPS.items():
        if role is None:
            continue
        r = getattr(cfg.resources, role)
        g = groups[name]
        n, params = g["replicas"], g["rayStartParams"]
        gpus, cpus = n * float(params["num-gpus"]), n * float(params["num-cpus"])
        # exactly full: with no spare GPUs anywhere, no role's placement group fits on another role's group
        assert r.count * r.gpus_per_actor == gpus, (name, r)
        assert r.count * r.cpus_per_actor <= cpus, (name, r)
        assert r.count <= n * _custom_resources(params)[resource], name


# the README's CPU-only reward run: reward workers without GPUs, pinned to reward-cpu instead of reward-gpu
CPU_REWARD_OVERRIDES = [
    "resources.reward_worker.gpus_per_actor=0",
    "resources.reward_worker.custom={rtdmd_reward_cpu: 1}",
]


Pods = dict[str, tuple[int, dict[str, float]]]


def _pods(spec_or_launcher: dict, *, at_most: bool = False) -> Pods:
    """worker group -> (pods, custom resources each pod advertises) of a KubeRay cluster spec or the launcher
    YAML; pods = replicas / min_workers, or maxReplicas / max_workers with ``at_most``."""
    if "available_node_types" in spec_or_launcher:
        types = spec_or_launcher["available_node_types"]
        out = {"head": (1, {k: v for k, v in types["head"]["resources"].items() if k not in ("CPU", "GPU")})}
        for group, node_type in LAUNCHER_NODE_TYPES.items():
            t = types[node_type]
            custom = {k: float(v) for k, v in t["resources"].items() if k not in ("CPU", "GPU")}
            out[group] = (t["max_workers" if at_most else "min_workers"], custom)
        return out
    out = {"head": (1, _custom_resources(spec_or_launcher["headGroupSpec"]["rayStartParams"]))}
    for g in spec_or_launcher["workerGroupSpecs"]:
        n = g["maxReplicas" if at_most else "replicas"]
        out[g["groupName"]] = (n, _custom_resources(g["rayStartParams"]))
    return out


def _pinning_problems(cfg: Any, pods: Pods, role: str, group: str) -> list[str]:
    """Why config role ``role`` is not pinned to worker group ``group`` by its custom resources (or does not
    fit there): each requested resource must be advertised by that group only, count x amount <= pods x
    advertised."""
    r = getattr(cfg.resources, role)
    if not r.custom:
        return [f"resources.{role}.custom is empty: {role} actors are not pinned to {group}"]
    problems = []
    for name, amount in r.custom.items():
        holders = sorted(g for g, (_, adv) in pods.items() if adv.get(name, 0) > 0)
        if holders != [group]:
            problems.append(f"resources.{role}.custom.{name}: advertised by {holders}, not by {group} alone")
            continue
        n, adv = pods[group]
        if r.count * amount > n * adv[name]:
            problems.append(
                f"resources.{role}: {r.count} x {name}={amount} > {n} pods x {adv[name]} advertised by "
                f"{group}"
            )
    return problems


@pytest.mark.parametrize("where", ["raycluster.yaml", "rayjob.yaml", "cluster-launcher.yaml"])
def test_cluster_config_custom_resources_pin_each_role_to_its_group(raycluster, rayjob, where):
    from rtdmd_ray.config import apply_overrides, load_config

    doc = {
        "raycluster.yaml": raycluster["spec"],
        "rayjob.yaml": rayjob["spec"]["rayClusterSpec"],
        "cluster-launcher.yaml": _load("cluster-launcher.yaml"),
    }[where]
    cfg = load_config(CLUSTER_CONFIG)
    pods = _pods(doc)
    assert pods["head"][1] == {}, "the head advertises no role resource: no role actor runs there"
    for group, (role, resource, _) in ROLE_GROUPS.items():
        if role is not None:
            assert _pinning_problems(cfg, pods, role, group) == [], where
            assert resource in getattr(cfg.resources, role).custom, (where, role)
    # CPU-only rewards: the same pool, pinned to reward-cpu (0 pods by default: it fits once scaled up)
    cpu_cfg = apply_overrides(cfg, CPU_REWARD_OVERRIDES)
    assert _pinning_problems(cpu_cfg, _pods(doc, at_most=True), "reward_worker", "reward-cpu") == [], where
    assert "rtdmd_reward" not in cpu_cfg.resources.reward_worker.custom


def test_pinning_check_catches_a_group_that_lost_its_resource_or_is_too_small(raycluster):
    from rtdmd_ray.config import apply_overrides, load_config

    cfg = load_config(CLUSTER_CONFIG)
    spec = copy.deepcopy(raycluster["spec"])
    spec["workerGroupSpecs"][1]["rayStartParams"].pop("resources")  # sampler-gpu no longer advertises it
    problems = _pinning_problems(cfg, _pods(spec), "sampler", "sampler-gpu")
    assert "not by sampler-gpu alone" in " ".join(problems)
    more = apply_overrides(cfg, ["resources.learner.count=16", "dmd.prompts_per_step=16"], validate=False)
    assert "16 x rtdmd_learner=1.0 > 1 pods x 8" in " ".join(
        _pinning_problems(more, _pods(raycluster["spec"]), "learner", "learner-gpu")
    )
    unpinned = apply_overrides(cfg, ["resources.sampler.custom={}"])
    problems = _pinning_problems(unpinned, _pods(raycluster["spec"]), "sampler", "sampler-gpu")
    assert "is empty" in " ".join(problems)


def test_rayjob_entrypoint_is_a_valid_resumable_train_run(raycluster, rayjob):
    from rtdmd_ray.config import load_config

    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["rtdmd-ray", "train"]
    config, overrides = argv[2], argv[3:]
    assert config.startswith(IMAGE_ROOT + "/")
    cfg = load_config(REPO / config[len(IMAGE_ROOT) + 1 :], overrides)  # fails on a bad key or value
    assert cfg.stage == "rtdmd" and cfg.train.resume == "auto" and "train.resume=auto" in overrides
    # checkpoints on the shared volume, which the head (driver) and the learners (rank 0 writes) both mount
    pvc = _load("pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    out = Path(cfg.train.output_dir)
    assert out.is_absolute()
    for group, g in _groups(spec["rayClusterSpec"]):
        pod = g["template"]["spec"]
        claims = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims]
        assert any(out.is_relative_to(m) for m in mounts), (group, mounts)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("backoffLimit", 0) >= 1  # a retry is a resubmission that resumes
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars", "working_dir", "pip", "py_modules", "excludes", "config"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


# ------------------------------------------------------------------------------------------ VM launcher


def test_cluster_launcher_matches_ray_schema_and_the_manifest(raycluster):
    import ray

    launcher = _load("cluster-launcher.yaml")
    ray_schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(ray_schema).iter_errors(launcher)]
    assert errors == []
    broken = {**launcher, "head_node_typ": "head"}
    # the schema is strict at the top level: a misspelt key fails
    assert list(jsonschema.Draft7Validator(ray_schema).iter_errors(broken))

    types = launcher["available_node_types"]
    assert launcher["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert set(types) == {"head", *LAUNCHER_NODE_TYPES.values()}
    groups = dict(_groups(raycluster["spec"])[1:])
    for group, node_type in LAUNCHER_NODE_TYPES.items():
        params, t = groups[group]["rayStartParams"], types[node_type]
        want = {"CPU": int(params["num-cpus"]), "GPU": int(params["num-gpus"]), **_custom_resources(params)}
        assert t["resources"] == want, node_type
        assert t["labels"] == {"rtdmd-ray/role": ROLE_GROUPS[group][2]}, node_type
        assert t["max_workers"] >= t["min_workers"] == groups[group]["replicas"], node_type
    assert launcher["max_workers"] >= sum(t.get("max_workers", 0) for k, t in types.items() if k != "head")
    head_cmds = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "--num-cpus=0" in head_cmds
    for cmds in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cmds)
