"""The cluster files are checked with the validators Ray itself uses, not by eye.

Autoscaler YAMLs go through `ray up`'s own path (prepare_config -> validate_config, the schema
ray/autoscaler/ray-schema.json); KubeRay manifests are checked for the fields the operator needs;
Serve configs go through Ray Serve's ServeDeploySchema. No Ray cluster is started: only Ray's
validator modules are imported.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
AUTOSCALER_YAMLS = ["aws.yaml", "gcp.yaml", "local.yaml"]
CLOUD_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = CLUSTER / "serve" / "world_model.yaml"

# What the platform asks for (docs/cluster.md, "Resources"): one unit per Ray Train worker
# (with one GPU), one unit per Serve replica (with half a GPU).
TRAIN_RESOURCE = "moedream_train"
SERVE_RESOURCE = "moedream_serve"
CUSTOM_RESOURCES = {TRAIN_RESOURCE, SERVE_RESOURCE}


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------- autoscaler YAMLs


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_autoscaler_yaml_passes_rays_validation(name):
    prepared = ray_up_validate(load(CLUSTER / name))
    assert prepared["max_workers"] >= 1
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    node_types = prepared["available_node_types"]
    assert prepared["head_node_type"] in node_types
    for node_type in node_types.values():
        assert node_type["min_workers"] <= node_type["max_workers"]


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_yaml_is_complete_without_ray_defaults(name):
    """The file alone (no defaults merged) satisfies the schema: nothing is left implicit."""
    from ray.autoscaler._private.util import validate_config

    validate_config(load(CLUSTER / name))


BREAKAGES = {
    "max_workers_wrong_type": lambda c: c.update(max_workers="twelve"),
    "unknown_top_level_key": lambda c: c.update(max_worker=3),
    "idle_timeout_wrong_type": lambda c: c.update(idle_timeout_minutes="5m"),
    "sync_flag_wrong_type": lambda c: c.update(file_mounts_sync_continuously="yes"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_broken_copy_fails_rays_validation(name, breakage):
    from ray.autoscaler._private.util import validate_config

    config = ray_up_validate(load(CLUSTER / name))
    BREAKAGES[breakage](config)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_broken_node_type_fails_rays_validation(name):
    config = load(CLUSTER / name)
    # Autoscaler resources are whole units: a fractional CPU count is a schema error.
    config["available_node_types"]["cpu_worker"]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        ray_up_validate(config)
    config = load(CLUSTER / name)
    config["available_node_types"]["cpu_worker"]["instance_type"] = "c6i.4xlarge"
    with pytest.raises(jsonschema.ValidationError):
        ray_up_validate(config)


def node_types_by_role(config: dict) -> dict[str, dict]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    workers = {n: t["resources"] for n, t in types.items() if n != config["head_node_type"]}
    return {
        "head": head,
        "train": [r for r in workers.values() if TRAIN_RESOURCE in r],
        "serve": [r for r in workers.values() if SERVE_RESOURCE in r],
        "cpu": [r for r in workers.values() if not r.get("GPU")],
    }


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_node_types_offer_what_the_platform_requests(name):
    config = load(CLUSTER / name)
    roles = node_types_by_role(config)
    # The gate (num_cpus 0.25) and the drivers live on a CPU-only head.
    assert roles["head"].get("CPU", 0) >= 1 and not roles["head"].get("GPU")
    assert not CUSTOM_RESOURCES & set(roles["head"])
    assert roles["cpu"], "no CPU worker type for env runners"
    assert roles["train"] and roles["serve"]
    for res in roles["train"]:  # each Train worker: 1 GPU + 1 moedream_train
        assert res["GPU"] >= 1 and res[TRAIN_RESOURCE] == res["GPU"]
    serve = serve_deployment(load(SERVE_CONFIG))
    gpus_per_replica = serve["ray_actor_options"]["num_gpus"]
    for res in roles["serve"]:  # replicas fit the node's GPUs exactly
        assert res[SERVE_RESOURCE] * gpus_per_replica == res["GPU"]
    # Serve's autoscaling ceiling is what the serve nodes can hold at their max count.
    capacity = sum(
        t["max_workers"] * t["resources"][SERVE_RESOURCE]
        for t in config["available_node_types"].values()
        if SERVE_RESOURCE in t["resources"]
    )
    assert serve["autoscaling_config"]["max_replicas"] == capacity
    used = set().union(*(set(t["resources"]) for t in config["available_node_types"].values()))
    assert used - {"CPU", "GPU"} == CUSTOM_RESOURCES


def test_local_yaml_advertises_custom_resources_per_gpu_host():
    prepared = ray_up_validate(load(CLUSTER / "local.yaml"))
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    for name in CUSTOM_RESOURCES:
        assert f'\\"{name}\\"' in worker_start
    assert "nvidia-smi" in worker_start and "--resources=" in worker_start
    # The pool scales: hosts start on demand and stop after the idle timeout.
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == 0 < node_type["max_workers"]


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_setup_installs_the_pins_and_starts_ray_with_token_auth(name):
    config = load(CLUSTER / name)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    install_at = next(i for i, c in enumerate(setup) if "-c ~/moedream/constraints.txt -e" in c)
    assert torch_at < install_at
    assert any("--no-deps overcooked-ai==1.1.0" in c for c in setup)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)


# ---------------------------------------------------------------- KubeRay manifests


def container_of(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def custom_resources_of(group: dict) -> dict[str, float]:
    """rayStartParams.resources is a quoted JSON string: '"{\\"name\\": 1}"'."""
    raw = group["rayStartParams"].get("resources")
    if raw is None:
        return {}
    return json.loads(raw.strip().strip('"').replace('\\"', '"'))


def check_raycluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert container_of(head)["resources"]["limits"]["cpu"]
    assert not custom_resources_of(head)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        container = container_of(group)
        assert container["image"] == container_of(head)["image"]
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"]
        custom = custom_resources_of(group)
        assert set(custom) <= CUSTOM_RESOURCES
        gpus = limits.get("nvidia.com/gpu", 0)
        if TRAIN_RESOURCE in custom:
            assert custom[TRAIN_RESOURCE] == gpus >= 1
        if SERVE_RESOURCE in custom:
            gpus_per_replica = serve_deployment(load(SERVE_CONFIG))["ray_actor_options"]["num_gpus"]
            assert custom[SERVE_RESOURCE] * gpus_per_replica == gpus
    for container in [container_of(head)] + [container_of(g) for g in spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_raycluster_manifest_has_what_kuberay_needs():
    manifest = load(KUBERAY / "raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"] == "moedream"
    check_raycluster_spec(manifest["spec"])
    groups = {g["groupName"]: g for g in manifest["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-worker", "gpu-train-worker", "gpu-serve-worker"}
    assert "nvidia.com/gpu" not in container_of(groups["cpu-worker"])["resources"]["limits"]
    offered = set().union(*(custom_resources_of(g) for g in groups.values()))
    assert offered == CUSTOM_RESOURCES


def test_rayjob_runs_world_model_training_on_the_raycluster():
    job = load(KUBERAY / "rayjob-train-world-model.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    cluster = load(KUBERAY / "raycluster.yaml")
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    match = re.match(
        r"python -m moedream\.platform\.jobs\.train_world_model --config \S+/configs/(\S+\.yaml)$",
        spec["entrypoint"],
    )
    assert match, spec["entrypoint"]
    from moedream.platform.train import DistributedTrainConfig

    # the image holds the repository: the config it names exists and asks for the GPU role
    train = DistributedTrainConfig.load(ROOT / "configs" / match.group(1))
    assert train.use_gpu and train.resources_per_worker == {TRAIN_RESOURCE: 1}
    assert train.storage_path.startswith("/mnt/moedream") and train.data.startswith("/mnt/moedream")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_AUTH_MODE"] == "token"
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert {e["name"] for e in submitter["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_rayservice_embeds_exactly_the_serve_config():
    service = load(KUBERAY / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["metadata"]["name"]
    assert isinstance(service["spec"]["serveConfigV2"], str)
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == load(SERVE_CONFIG)
    spec = service["spec"]["rayClusterConfig"]
    check_raycluster_spec(spec)
    # Its groups are the RayCluster's groups of the same name, unchanged.
    cluster = load(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["headGroupSpec"] == cluster["headGroupSpec"]
    cluster_groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group in spec["workerGroupSpecs"]:
        assert group == cluster_groups[group["groupName"]]
    offered = set().union(*(custom_resources_of(g) for g in spec["workerGroupSpecs"]))
    assert SERVE_RESOURCE in offered


# ---------------------------------------------------------------- Serve config


def serve_deployment(config: dict) -> dict:
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    return deployment


def validate_serve_config(config: dict):
    """Ray Serve's own schema, plus a check for unknown keys (it ignores some extras)."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    unknown = set(config) - set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        unknown |= set(app) - set(ServeApplicationSchema.model_fields)
        for deployment in app["deployments"]:
            unknown |= set(deployment) - set(DeploymentSchema.model_fields)
    assert not unknown, f"keys Ray Serve does not know: {sorted(unknown)}"
    return schema


@pytest.mark.parametrize(
    "source", ["cluster/serve/world_model.yaml", "cluster/kuberay/rayservice.yaml"]
)
def test_serve_config_passes_ray_serve_schema(source):
    data = load(ROOT / source)
    config = yaml.safe_load(data["spec"]["serveConfigV2"]) if "spec" in data else data
    schema = validate_serve_config(config)
    (app,) = schema.applications
    assert (app.name, app.route_prefix) == ("world_model", "/")
    assert app.import_path == "moedream.platform.serve:build_app"
    assert "checkpoint" in app.args
    (deployment,) = app.deployments
    assert deployment.name == "WorldModelDeployment"
    assert deployment.user_config["checkpoint"] == app.args["checkpoint"]
    assert deployment.ray_actor_options.resources == {SERVE_RESOURCE: 1}
    assert schema.http_options.port == 8000


def test_broken_serve_config_fails_ray_serve_schema():
    from pydantic import ValidationError

    config = load(SERVE_CONFIG)
    serve_deployment(config)["ray_actor_options"]["num_gpus"] = -1
    with pytest.raises(ValidationError):
        validate_serve_config(config)
    config = load(SERVE_CONFIG)
    serve_deployment(config)["num_replica"] = 2  # typo of num_replicas
    with pytest.raises(AssertionError, match="num_replica"):
        validate_serve_config(config)


# ---------------------------------------------------------------- docs


def test_docs_name_every_cluster_file_and_resource():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for name in CUSTOM_RESOURCES:
        assert f"`{name}`" in docs or f'"{name}"' in docs
    for path in ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/local.yaml"]:
        assert f"ray up {path}" in docs
    for path in sorted(p.relative_to(ROOT).as_posix() for p in KUBERAY.glob("*.yaml")):
        assert path in docs
    for command in [
        "ray job submit",
        "moedream.platform.jobs.train_world_model",
        "moedream.platform.jobs.train ",
        "moedream.platform.jobs.train_agents",
        "serve deploy cluster/serve/world_model.yaml",
        "moedream sweep",
        "tensorboard --logdir",
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_MODE=disabled",
    ]:
        assert command in docs, command


# ---------------------------------------------------------------- every command the docs show

DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks (backslash continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def moedream_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(module of the entry point, its arguments) for each moedream entry point a shell line
    runs: `moedream <sub> ...`, `python -m moedream.x ...`, also after `ray job submit ... --`."""
    import shlex

    from moedream.platform.cli import COMMANDS

    tokens = shlex.split(command)
    if "--" in tokens:  # ray job submit [options] -- <entry point>
        tokens = tokens[tokens.index("--") + 1 :]
    if tokens[:1] == ["moedream"]:
        assert len(tokens) > 1 and tokens[1] in COMMANDS, f"no moedream subcommand: {command}"
        return [(f"moedream.platform.commands.{COMMANDS[tokens[1]]}", tokens[2:])]
    if (
        tokens[:1]
        and tokens[0].endswith("python")
        and tokens[1:2] == ["-m"]
        and tokens[2].startswith("moedream.")
    ):
        return [(tokens[2], tokens[3:])]
    return []


@pytest.mark.parametrize("doc", DOCS)
def test_every_moedream_command_in_the_docs_parses_and_names_files_that_exist(doc):
    """A docs check: each moedream command of README.md and docs/ parses with its entry
    point's own argument parser, and every repository file it names exists."""
    import argparse
    import importlib
    import shlex

    commands = shell_commands((ROOT / doc).read_text())
    checked = 0
    for command in commands:
        for module_name, args in moedream_invocations(command):
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(prog=module_name, exit_on_error=False)
            module.add_arguments(parser)
            try:
                parser.parse_args(args)
            except (argparse.ArgumentError, SystemExit) as err:
                pytest.fail(f"{doc}: `{command}` does not parse: {err}")
            checked += 1
        for token in shlex.split(command):
            if re.match(r"(configs|cluster|docs|benchmarks)/", token):
                assert (ROOT / token).exists(), f"{doc}: `{command}` names a missing {token}"
    if doc == "README.md":
        assert checked >= 5, commands


RAY_CLIS = {"ray": "ray.scripts.scripts", "serve": "ray.serve.scripts"}  # their console scripts


def ray_invocations(command: str) -> list[list[str]]:
    """The `ray ...` / `serve ...` commands of one shell line (after `VAR=value` prefixes and
    `export`, each side of `&&`)."""
    import shlex

    tokens = shlex.split(command)
    parts, current = [], []
    for token in [*tokens, "&&"]:
        if token != "&&":
            current.append(token)
            continue
        while current and re.match(r"^[A-Z_]+=", current[0]):
            current = current[1:]  # environment prefix
        if current and current[0] in RAY_CLIS:
            parts.append(current)
        current = []
    return parts


def parse_with_rays_cli(argv: list[str]):
    """Parse a `ray`/`serve` command with Ray's own click CLI (its options, arguments and
    types), without running it; returns the command's click context."""
    import importlib

    import click

    command = importlib.import_module(RAY_CLIS[argv[0]]).cli
    context, name, args = None, argv[0], argv[1:]
    while isinstance(command, click.Group):
        context = click.Context(command, info_name=name, parent=context)
        name, *args = args
        sub = command.get_command(context, name)
        assert sub is not None, f"`{' '.join(argv)}`: Ray's CLI has no command {name!r}"
        command = sub
    return command.make_context(name, args, parent=context)


@pytest.mark.parametrize("doc", DOCS)
def test_every_ray_and_serve_command_in_the_docs_parses_with_rays_cli(doc, monkeypatch):
    """A docs check: each `ray`/`serve` command of README.md and docs/ parses with the CLI the
    shell would run (Ray 2.60's click commands); `ray start --resources` asks for the
    platform's own custom resources."""
    import click

    monkeypatch.chdir(ROOT)  # the docs name files relative to the repository
    checked = 0
    for command in shell_commands((ROOT / doc).read_text()):
        for argv in ray_invocations(command):
            try:
                context = parse_with_rays_cli(argv)
            except click.ClickException as err:
                pytest.fail(f"{doc}: `{command}` does not parse: {err.format_message()}")
            if argv[:2] == ["ray", "start"] and context.params.get("resources"):
                assert set(json.loads(context.params["resources"])) <= CUSTOM_RESOURCES, command
            checked += 1
    if doc == "docs/cluster.md":
        assert checked >= 12, checked  # ray start/up/dashboard/job submit/exec, serve deploy


def _first_table(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_readme_results_table_is_a_copy_of_the_results_block():
    """The README opens with the results table: a copy of the block the results runner writes."""
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "results" / "results_overcooked.md").read_text()
    block = re.search(r"<!-- bench:results_overcooked -->(.*?)<!-- /bench", results, re.S)
    assert block, "benchmarks/results/results_overcooked.md has no block results_overcooked"
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    assert _first_table(section) == _first_table(block.group(1)), (
        "README.md's results table differs from the first table of the block "
        "results_overcooked in benchmarks/results/results_overcooked.md: copy that table into "
        "the README"
    )


def test_make_targets_the_readme_names_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"\bmake ([a-z][a-z-]*)", readme)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"make {target}"
