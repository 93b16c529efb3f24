"""The deployment files under infra/ parse and hang together (no Docker engine or cluster runs here, so
this checks structure: services, images, wiring, versions — not that the containers start)."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yml"


def _default(value: str) -> str:
    """Compose interpolation with an empty environment: ${X:-default} -> default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _load(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    assert _load(path), f"{path} is empty"


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)[0]


def test_compose_has_the_scale_out_services(compose: dict) -> None:
    services = compose["services"]
    expected = {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
                "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker"}  # fmt: skip
    assert expected <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_airflow_runs_celery_on_postgres_and_redis(compose: dict) -> None:
    services = compose["services"]
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker"):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert _default(env["FMX_LAKE"]).startswith("s3://fmx-lake/")
        assert services[name]["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert "celery worker" in " ".join(services["airflow-worker"]["command"])
    init = services["airflow-init"]["command"][0]
    assert "airflow db migrate" in init and "airflow pools set fmx_training" in init


def test_compose_mlflow_uses_postgres_and_s3(compose: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--artifacts-destination=s3://" in args and "--app-name=basic-auth" in args
    assert "--backend-store-uri" not in args  # a store URL may hold a password: environment only
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    worker = compose["services"]["airflow-worker"]["environment"]
    assert worker["MLFLOW_TRACKING_PASSWORD"] == mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    for name in ("postgres", "redis", "minio", "mlflow", "airflow-apiserver"):
        assert "healthcheck" in compose["services"][name], f"{name} has no healthcheck"


def test_compose_secrets_come_from_the_env_file(compose: dict) -> None:
    text = COMPOSE.read_text()
    needed = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = (COMPOSE.parent / "example.env").read_text()
    assert needed <= set(re.findall(r"^([A-Z_]+)=", example, flags=re.M)), needed


def test_helm_values_use_kubernetes_executor_and_our_airflow() -> None:
    values = _load(INFRA / "helm" / "values-airflow.yaml")[0]
    assert values["executor"] == "KubernetesExecutor"
    assert values["airflowVersion"] == version("apache-airflow")
    assert values["postgresql"]["enabled"] is False and values["data"]["metadataSecretName"]
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["FMX_LAKE"].startswith("s3://") and env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")


def test_torchrun_job_ranks_and_rendezvous_agree() -> None:
    service, job = _load(INFRA / "k8s" / "fm-train-job.yaml")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    args = " ".join(pod["containers"][0]["args"])
    nnodes = int(re.search(r"--nnodes=(\d+)", args).group(1))
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nnodes
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert (
        service["spec"]["clusterIP"] == "None"
        and service["spec"]["selector"]["job-name"] == job["metadata"]["name"]
    )
    assert f"--master_addr={job['metadata']['name']}-0.{pod['subdomain']}" in args
    assert "-m fm.train" in args and (ROOT / "fm" / "train.py").exists()


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.trainer"])
def test_dockerfiles_copy_existing_paths(dockerfile: str) -> None:
    text = (INFRA / "docker" / dockerfile).read_text()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for src in line.split():
            assert (ROOT / src).exists(), f"{dockerfile}: COPY source {src} does not exist"
    assert "FROM python:3.11" in text


def test_scaleout_requirements_are_pinned() -> None:
    lines = [
        ln.split("#")[0].strip()
        for ln in (INFRA / "docker" / "requirements-scaleout.txt").read_text().splitlines()
    ]
    reqs = [ln for ln in lines if ln]
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", r) for r in reqs), reqs


def test_ci_setup_script_is_valid_bash() -> None:
    script = INFRA / "ci-setup.sh"
    assert script.stat().st_mode & 0o111, "infra/ci-setup.sh is not executable"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
