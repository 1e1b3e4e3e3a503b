"""Static checks of infra/: the Prefect deployments, the Ray cluster configs, the stack script."""

import importlib
import inspect
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _load(rel: str) -> dict:
    return yaml.safe_load((INFRA / rel).read_text())


def _flow_of(entrypoint: str):
    """Import the function an entrypoint ``path/to/file.py:func`` names (as Prefect would)."""
    path, _, func = entrypoint.partition(":")
    file = ROOT / path
    assert file.is_file(), f"entrypoint file {path} does not exist"
    assert re.search(rf"^def {re.escape(func)}\(", file.read_text(), re.M), f"{func} not defined in {path}"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, func)


# --- Prefect -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prefect_yaml():
    return _load("prefect.yaml")


def _deployment(cfg: dict, name: str) -> dict:
    (dep,) = [d for d in cfg["deployments"] if d["name"] == name]
    return dep


def test_nightly_deployment_points_at_the_scan_flow(prefect_yaml):
    dep = _deployment(prefect_yaml, "nightly")
    assert dep["entrypoint"] == "flows/scan_models.py:scan_models"
    flow = _flow_of(dep["entrypoint"])
    assert flow.name == "scan-models"
    # every parameter of the deployment is a parameter of the flow
    assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    assert dep["work_pool"]["name"] == "dispersion"


def test_prefect_yaml_names_the_installed_prefect(prefect_yaml):
    import prefect

    assert prefect_yaml["prefect-version"] == prefect.__version__
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith("prefect")]
    assert pins == [f"prefect=={prefect.__version__}"]


def test_every_flow_parameter_has_a_description(prefect_yaml):
    from prefect.utilities.callables import parameter_schema

    for dep in prefect_yaml["deployments"]:
        schema = parameter_schema(_flow_of(dep["entrypoint"]).fn)
        missing = [k for k, v in schema.properties.items() if not v.get("description")]
        assert not missing, f"{dep['name']}: parameters without a description: {missing}"


def test_nightly_config_exists_and_validates(prefect_yaml):
    from dispersion.config import load_config

    config = _deployment(prefect_yaml, "nightly")["parameters"]["config"]
    assert (ROOT / config).is_file()
    load_config(ROOT / config)


def test_nightly_schedule_is_a_valid_daily_cron(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    (sched,) = _deployment(prefect_yaml, "nightly")["schedules"]
    cron = CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))
    assert cron.timezone == "UTC"
    minute, hour, dom, month, dow = sched["cron"].split()
    assert (dom, month, dow) == ("*", "*", "*") and hour.isdigit() and minute.isdigit()


def test_sweep_deployment_has_no_schedule(prefect_yaml):
    dep = _deployment(prefect_yaml, "sweep")
    assert dep["entrypoint"] == "flows/checkpoint_sweep.py:checkpoint_sweep"
    assert not dep.get("schedules")
    if not (ROOT / "flows/checkpoint_sweep.py").is_file():
        pytest.skip("flows/checkpoint_sweep.py not written yet")
    flow = _flow_of(dep["entrypoint"])
    assert flow.name == "checkpoint-sweep"
    assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)


def test_flow_runs_start_in_the_repo_root(prefect_yaml):
    """A process worker starts a flow run in a temporary folder: the pull step must chdir to
    the checkout, whose path the build step records at deploy time."""
    (step,) = prefect_yaml["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    (build,) = prefect_yaml["build"]
    shell = build["prefect.deployments.steps.run_shell_script"]
    assert directory == "{{ " + shell["id"] + ".stdout }}"
    for extra, expected in (({}, str(ROOT)), ({"DISPERSION_REPO": "/srv/dispersion"}, "/srv/dispersion")):
        out = subprocess.run(["sh", "-c", shell["script"]], cwd=ROOT, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PWD": "/nonexistent", **extra}, timeout=10)
        assert out.stdout.strip() == expected


# --- Ray -----------------------------------------------------------------------------------

def test_ray_up_config_is_valid_with_a_gpu_worker_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load("ray/cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg.get(key), key
    validate_config(prepare_config(cfg))  # Ray's own schema
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(types[n]["max_workers"] >= types[n].get("min_workers", 0) for n in gpu)
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    repo_at = next(i for i, c in enumerate(setup) if "install" in c and "-e" in c.split())
    assert torch_at < repo_at
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address" in c for c in cfg["worker_start_ray_commands"])


def test_kuberay_cluster_has_a_gpu_worker_group_and_secret_credentials():
    cfg = _load("k8s/raycluster.yaml")
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayCluster"
    spec = cfg["spec"]
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for g in [head, *groups]:
        # KubeRay wants a map of strings for rayStartParams
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values())
        for c in g["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if re.search(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD)(_|$)", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


# --- everything ----------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                                     # access key id
    re.compile(r"(?i)secret[_ ]?access[_ ]?key\W{1,4}[A-Za-z0-9/+=]{40}\b"),        # secret key
    re.compile(r"(?i)(password|passwd|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=_\-]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_credential_patterns_catch_the_usual_forms():
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    for text in (f"aws_access_key_id = {fake_id}", f"AWS_SECRET_ACCESS_KEY={fake_secret}",
                 f"aws_secret_access_key: '{fake_secret}'"):
        assert any(p.search(text) for p in SECRET_PATTERNS), text
    assert not any(p.search("export AWS_SECRET_ACCESS_KEY=test") for p in SECRET_PATTERNS)


def test_no_literal_credentials_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for p in files:
        text = p.read_text(errors="replace")
        for pat in SECRET_PATTERNS:
            assert not pat.search(text), f"{p.relative_to(ROOT)}: looks like a credential ({pat.pattern})"


def test_stack_script_parses_and_rejects_unknown_commands():
    script = INFRA / "stack.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=10).returncode == 0
    out = subprocess.run(["bash", str(script), "restart"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and "usage" in out.stderr


def test_artifact_keys_differ_per_root_and_are_valid():
    from tasks.steps import artifact_key

    local, s3 = artifact_key("My_Run.1", "runs/default"), artifact_key("My_Run.1", "s3://bucket/dispersion/")
    assert local != s3 and local == artifact_key("My_Run.1", "runs/default/")
    assert all(re.fullmatch(r"[a-z0-9-]+", k) for k in (local, s3)) and local.startswith("dispersion-my-run-1-")
