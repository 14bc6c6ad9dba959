"""docker-compose.yml (and the GPU override), checked without a Docker engine: mounted files exist, Prometheus
scrapes the server, the management API is not published, Prometheus and Grafana stay on loopback unless
MONITORING_BIND opens them, Grafana needs a chosen admin password."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy_files import ComposeVariableError, interpolate, published
from tests.promtools import PROMETHEUS_YML, REPO, load_yaml


def test_monitoring_is_on_loopback_unless_opened_and_grafana_needs_a_chosen_password() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    services = compose["services"]
    for name, port in (("prometheus", "9090"), ("grafana", "3000")):
        (entry,) = services[name]["ports"]
        assert published(entry, {}) == ("127.0.0.1", port, port), f"{name} must default to loopback"
        assert published(entry, {"MONITORING_BIND": "0.0.0.0"}) == ("0.0.0.0", port, port), \
            f"{name}: MONITORING_BIND (documented) must open it"
    # TorchServe publishes nothing (the proxy and Prometheus reach it on the compose network); the only
    # published inference port is the proxy's HTTPS one.
    assert "ports" not in services["torchserve"]
    assert {published(p, {})[2] for p in services["proxy"]["ports"]} == {"8443"}
    grafana = services["grafana"]["environment"]
    with pytest.raises(ComposeVariableError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], {})
    assert interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], {"GRAFANA_ADMIN_PASSWORD": "s3cret"}) == "s3cret"
    assert str(grafana["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    assert str(grafana.get("GF_USERS_ALLOW_SIGN_UP", "false")).lower() == "false"
    docs = (REPO / "docs" / "deploy-and-monitor.md").read_text()
    assert "MONITORING_BIND" in docs and "GRAFANA_ADMIN_PASSWORD" in docs


def test_compose_interpolation_helper() -> None:
    assert interpolate("${A:-x}:${B}", {"B": "b"}) == "x:b"
    assert interpolate("${A:-x}", {"A": "a"}) == "a"
    with pytest.raises(ComposeVariableError, match="A: say it"):
        interpolate("${A:?say it}", {"A": ""})
    assert published("8080:8080", {}) == ("0.0.0.0", "8080", "8080")


def test_compose_mounts_existing_files_and_prometheus_scrapes_the_server() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    assert set(compose["services"]) == {"torchserve", "proxy", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    build = compose["services"]["torchserve"]["build"]
    assert (REPO / build["context"] / "Dockerfile").is_file() and build["args"]["VARIANT"] == "cpu"
    exposed = {str(p) for p in compose["services"]["torchserve"]["expose"]}
    assert exposed == {"8080", "8082"}, "only inference (for the proxy) and metrics (for Prometheus)"
    for service in compose["services"].values():
        ports = [str(p) for p in service.get("ports", [])]
        assert not any(p.split(":")[-1] == "8081" for p in ports), "the management API must not be published"
    # Prometheus reads /etc/prometheus/prometheus.yml and its rule file relative to it.
    prom_mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["prometheus"]["volumes"]
                       if v.startswith("./"))
    config_in_container = Path(prom_mounts["./monitoring/prometheus.yml"])
    assert f"--config.file={config_in_container}" in compose["services"]["prometheus"]["command"]
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:
        assert str(config_in_container.parent / rule_file) in prom_mounts.values()
    (job,) = [j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == "torchserve"]
    assert job["static_configs"][0]["targets"] == ["torchserve:8082"]
    gpu = load_yaml(REPO / "docker-compose.gpu.yml")["services"]["torchserve"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"


def test_compose_needs_the_archives_pinned_sha256() -> None:
    """EE_MODEL_SHA256 has no default in compose (nor in the image): docker compose stops until it is set."""
    env = load_yaml(REPO / "docker-compose.yml")["services"]["torchserve"]["environment"]
    with pytest.raises(ComposeVariableError, match="EE_MODEL_SHA256"):
        interpolate(env["EE_MODEL_SHA256"], {})
    pin = "mnist.mar=" + "ab" * 32
    assert interpolate(env["EE_MODEL_SHA256"], {"EE_MODEL_SHA256": pin}) == pin
    assert "EE_MODEL_SHA256" not in (REPO / "Dockerfile").read_text().split("ENV EE_HOME", 1)[1].split("\n\n")[0]
