"""deploy/kserve: the InferenceService and its ServingRuntime, checked as far as no cluster is needed.

kubernetes-validate has no schemas for KServe's CRDs (SchemaNotFoundError), so the documents' structure is
checked here with yaml against the fields of KServe's v1beta1 / v1alpha1 APIs, and every container they
carry is validated strictly against the Kubernetes API as a Pod's container.
"""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
K8S = REPO / "deploy" / "k8s"
HEALTHCHECK = ["/home/model-server/docker/entrypoint.sh", "healthcheck"]
# Fields of KServe's v1beta1 ComponentExtensionSpec + PredictorSpec and ModelSpec that these files may use.
PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout",
                    "canaryTrafficPercent", "labels", "annotations", "model", "serviceAccountName", "nodeSelector",
                    "tolerations", "affinity", "automountServiceAccountToken"}  # + PodSpec's token switch
MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "resources", "env", "args", "image"}
RUNTIME_FIELDS = {"annotations", "supportedModelFormats", "protocolVersions", "containers", "multiModel",
                  "disabled", "builtInAdapter", "nodeSelector", "tolerations", "affinity",
                  "volumes"}  # ServingRuntimePodSpec.volumes (the emptyDirs of the read-only root)


def _doc(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]
    return doc


def _as_pod(containers: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": containers}}


def test_kubernetes_validate_has_no_kserve_schema() -> None:
    """Why this file exists: the CRDs cannot be validated by kubernetes-validate (if it ever can, use it)."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(_doc("inferenceservice.yaml"), kubernetes_validate.latest_version(), strict=True)


def test_inference_service_structure() -> None:
    isvc = _doc("inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])  # DNS-1035 label
    assert set(isvc["spec"]) == {"predictor"}
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR_FIELDS
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in ("cpu", "memory") and 0 < predictor["scaleTarget"] <= 100
    model = predictor["model"]
    assert set(model) <= MODEL_FIELDS
    assert model["modelFormat"] == {"name": "pytorch"}
    assert model["protocolVersion"] == "v2"
    assert re.fullmatch(r"(gs|s3|pvc|https?)://\S+", model["storageUri"])
    assert "CHANGE-ME" in model["storageUri"]  # a placeholder, not somebody's bucket
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"  # exec probes, HPA
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"


def test_inference_service_resources_are_valid_container_resources() -> None:
    model = _doc("inferenceservice.yaml")["spec"]["predictor"]["model"]
    container = {"name": "kserve-container", "image": "x", "resources": model["resources"]}
    kubernetes_validate.validate(_as_pod([container]), kubernetes_validate.latest_version(), strict=True)
    assert set(model["resources"]) == {"requests", "limits"}


def test_serving_runtime_structure_and_what_the_service_asks_of_it() -> None:
    runtime, isvc = _doc("servingruntime.yaml"), _doc("inferenceservice.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = runtime["spec"]
    assert set(spec) <= RUNTIME_FIELDS
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the container KServe merges the predictor's fields into
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8082"
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"


@pytest.mark.parametrize("version", ("1.25.0", kubernetes_validate.latest_version()))
def test_serving_runtime_container_is_a_valid_container(version: str) -> None:
    (container,) = _doc("servingruntime.yaml")["spec"]["containers"]
    kubernetes_validate.validate(_as_pod([container]), version, strict=True)


def test_serving_runtime_matches_the_image_and_the_k8s_deployment() -> None:
    """Same image, entrypoint command, probes, token caveat and resources as deploy/k8s; the model store is the
    folder KServe's storage initializer fills."""
    (container,) = _doc("servingruntime.yaml")["spec"]["containers"]
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    (k8s,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == k8s["image"] and container["args"] == k8s["args"] == ["serve"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EE_MODEL_STORE"] == "/mnt/models"
    assert env["EE_TOKEN_AUTH"] == "off-behind-gateway"
    assert env["EE_MODELS"] == "all"
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == HEALTHCHECK
    assert container["resources"] == k8s["resources"]
    assert _doc("inferenceservice.yaml")["spec"]["predictor"]["model"]["resources"] == k8s["resources"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
    assert security["runAsUser"] == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_entrypoint_reads_the_model_store_variable(tmp_path: Path) -> None:
    """EE_MODEL_STORE (set to KServe's /mnt/models) is what the entrypoint serves."""
    import os
    import subprocess
    import sys

    store = tmp_path / "mnt-models"
    store.mkdir()
    (store / "mnist.mar").write_bytes(b"PK")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EE_")}, "EE_HOME": str(tmp_path),
           "EE_MODEL_STORE": str(store), "EE_MODEL_SHA256": "unpinned", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(REPO / "docker" / "entrypoint.sh"), "check"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"model_store={store}" in proc.stdout.splitlines()
