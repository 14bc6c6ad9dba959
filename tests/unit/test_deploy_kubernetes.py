"""Kubernetes manifests (deploy/k8s): kubernetes-validate (the API's own JSON schemas, strict) accepts them and
really checks, the kustomization applies every manifest, the objects agree with each other and with the
image, the Prometheus kubernetes_sd job is valid Prometheus configuration."""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy_files import K8S, k8s_docs, promtool_ok
from tests.promtools import ALERTS_YML, PROMETHEUS_YML, load_yaml

# The oldest (1.25) and newest Kubernetes API versions kubernetes-validate 1.37.0 ships schemas for.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def test_kustomization_applies_every_manifest() -> None:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert sorted(resources) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_api_schemas(version: str) -> None:
    """kubernetes-validate --strict: every field exists in the API version's schema, with the right type."""
    for name in load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} against Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False)


def test_kubernetes_validate_is_really_checking() -> None:
    deployment = next(d for d in k8s_docs() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


def test_k8s_manifests_agree() -> None:
    docs = k8s_docs()
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "Kustomization"} <= set(by_kind)
    deployment = by_kind["Deployment"]
    name = deployment["metadata"]["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    target = by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"inference": 8080, "metrics": 8082}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert {p["targetPort"] for p in by_kind["Service"]["spec"]["ports"]} == set(ports)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["/home/model-server/docker/entrypoint.sh", "healthcheck"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    # tokens off only together with a NetworkPolicy that admits just the gateway and Prometheus
    assert env["EE_TOKEN_AUTH"] == "off-behind-gateway"
    ingress_ports = sorted(p["port"] for rule in by_kind["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"])
    assert ingress_ports == [8080, 8082]


def test_k8s_prometheus_job_is_valid_prometheus_config(tmp_path: Path) -> None:
    """The kubernetes_sd job, checked by promtool (with static targets in place of the service discovery:
    Debian's Prometheus is built without the Kubernetes SD; the relabelling rules are what is checked)."""
    (job,) = load_yaml(K8S / "prometheus-kubernetes-job.yml")
    assert job["job_name"] == "torchserve" and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {tuple(r["source_labels"]): r for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["regex"] == "true"
    address = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    assert re.fullmatch(address["regex"], "10.0.0.7:8080;8082")
    assert re.sub(address["regex"], address["replacement"].replace("$", "\\"), "10.0.0.7:8080;8082") == \
           "10.0.0.7:8082"
    static = dict(job)
    del static["kubernetes_sd_configs"]
    static["static_configs"] = [{"targets": ["127.0.0.1:8082"]}]
    config = load_yaml(PROMETHEUS_YML)
    config["scrape_configs"] = [static]
    config["rule_files"] = [str(ALERTS_YML)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    promtool_ok("check", "config", str(path))


def _pin_source(env_entry: dict, config_maps: dict[str, dict]) -> str:
    ref = env_entry["valueFrom"]["configMapKeyRef"]
    return config_maps[ref["name"]]["data"][ref["key"]]


def test_archive_pins_come_from_a_configmap_whose_placeholder_is_refused() -> None:
    """k8s and KServe take EE_MODEL_SHA256 from a ConfigMap shipped beside them (the deployment's configuration,
    not the archive's folder); its placeholder is not a pin, so a pod started before it is replaced refuses."""
    from serving import server

    kserve = Path(K8S).parent / "kserve"
    config_maps = {d["metadata"]["name"]: d for d in k8s_docs() + [load_yaml(kserve / "model-pins.yaml")]
                   if d["kind"] == "ConfigMap"}
    deployment = next(d for d in k8s_docs() if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (k8s_pin,) = [e for e in container["env"] if e["name"] == server.PIN_ENV]
    isvc = load_yaml(kserve / "inferenceservice.yaml")
    (kserve_pin,) = [e for e in isvc["spec"]["predictor"]["model"]["env"] if e["name"] == server.PIN_ENV]
    for entry in (k8s_pin, kserve_pin):
        placeholder = _pin_source(entry, config_maps)
        assert placeholder.startswith("mnist-quick.mar=CHANGE-ME")
        with pytest.raises(server.ServerError, match="expected NAME.mar=<64 hex digits>"):
            server.parse_pins(placeholder)
        assert server.parse_pins(placeholder.replace(placeholder.split("=", 1)[1], "ab" * 32)) == {
            "mnist-quick.mar": "ab" * 32}
    for name in ("model-pins.yaml",):
        kubernetes_validate.validate(load_yaml(kserve / name), kubernetes_validate.latest_version(), strict=True)
