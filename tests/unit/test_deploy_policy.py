"""Static checks of the access policy in the deployment files: the proxy config (deploy/proxy), compose's
published ports, and the Kubernetes / KServe NetworkPolicies, service-account tokens and read-only roots.

The proxy's behaviour is tested live in tests/integration/test_proxy.py; here: HAProxy accepts the shipped file
with its production defaults, those defaults agree with the handler's, and nothing else publishes TorchServe.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from serving.decoding import PHOTO_JPEG_BYTES, derive_limits

REPO = Path(__file__).resolve().parents[2]
PROXY = REPO / "deploy" / "proxy"
HAPROXY_CFG = PROXY / "haproxy.cfg"
K8S = REPO / "deploy" / "k8s"
KSERVE = REPO / "deploy" / "kserve"
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
# Paths TorchServe (through docker/entrypoint.sh) writes to, by the variable that names them.
WRITABLE_VARS = ("EE_HOME", "LOG_LOCATION", "METRICS_LOCATION", "TMPDIR")
# Files of the image the server only reads: a volume mounted over them would hide them.
IMAGE_FILE_VARS = ("EE_BASE_CONFIG", "EE_METRICS_CONFIG", "EE_LOG_CONFIG")


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _presetenv() -> dict[str, str]:
    return {m.group(1): m.group(2).strip('"') for m in
            re.finditer(r"^\s*presetenv\s+(\S+)\s+(\S+)", HAPROXY_CFG.read_text(), re.M)}


# --------------------------------------------------------------------------------------------------- proxy
def test_proxy_body_limit_is_the_handlers_limit() -> None:
    """One number: the proxy's default EE_MAX_PAYLOAD_BYTES, compose's value and TorchServe's max_request_size,
    which is at least the largest body a photo model's handler accepts (a camera JPEG)."""
    properties = (REPO / "serving" / "config.properties").read_text()
    (limit,) = [int(v) for v in re.findall(r"^max_request_size=(\d+)$", properties, re.M)]
    assert derive_limits((3, 32, 32)).jpeg_bytes == PHOTO_JPEG_BYTES <= limit
    defaults = _presetenv()
    assert int(defaults["EE_MAX_PAYLOAD_BYTES"]) == limit
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert int(compose["services"]["proxy"]["environment"]["EE_MAX_PAYLOAD_BYTES"]) == limit
    # The whole allowed body plus headers fits one buffer (read, checked and re-sendable on a retry).
    assert int(defaults["EE_PROXY_BUFSIZE"]) >= limit + 65536
    assert 'tune.bufsize "${EE_PROXY_BUFSIZE}"' in HAPROXY_CFG.read_text()


def test_proxy_sends_only_to_the_inference_port_over_tls_and_logs_to_stdout() -> None:
    text = HAPROXY_CFG.read_text()
    defaults = _presetenv()
    assert defaults["EE_PROXY_BACKEND"] == "torchserve:8080"  # never management (8081) or metrics (8082)
    assert re.findall(r"^\s*server\s+\S+\s+(\S+)", text, re.M) == ['"${EE_PROXY_INNER}"', '"${EE_PROXY_BACKEND}"']
    (bind,) = [line for line in re.findall(r"^\s*bind\s+(.*)$", text, re.M) if "EE_PROXY_BIND" in line]
    assert " ssl crt " in bind  # no plain-HTTP listener at all
    assert "ssl-min-ver TLSv1.2" in text
    assert re.search(r"^\s*log stdout ", text, re.M)
    for status in (400, 401, 404, 405, 413, 429):
        assert re.search(rf"return status {status} content-type application/json ", text), status
    # Timeouts that bound a slow client, all set.
    for name in ("http-request", "client", "http-keep-alive", "server"):
        assert re.search(rf"^\s*timeout {name} ", text, re.M), name


def _haproxy_check(tmp_path: Path, config: Path, **env: str) -> subprocess.CompletedProcess:
    haproxy = shutil.which("haproxy")
    if not haproxy:
        pytest.fail("`haproxy` is not on PATH: apt-get install haproxy (Makefile SYSTEM_PACKAGES)", pytrace=False)
    subprocess.run([str(PROXY / "make-cert.sh"), str(tmp_path / "certs")], check=True, capture_output=True)
    return subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                               "EE_PROXY_CERT": str(tmp_path / "certs" / "server.pem"), **env})


def test_haproxy_accepts_the_shipped_config_with_its_defaults(tmp_path: Path) -> None:
    """`haproxy -c` with the production defaults (only the certificate path differs; the backend name is not
    resolved here, so it points at loopback)."""
    proc = _haproxy_check(tmp_path, HAPROXY_CFG, EE_PROXY_BACKEND="127.0.0.1:8080")
    assert proc.returncode == 0 and "Configuration file is valid" in proc.stdout, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    broken = tmp_path / "broken.cfg"
    broken.write_text(HAPROXY_CFG.read_text().replace("retry-on 425 ", "retry-on 507 "))
    assert _haproxy_check(tmp_path, broken, EE_PROXY_BACKEND="127.0.0.1:8080").returncode != 0


def test_compose_publishes_the_proxy_and_not_torchserve() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "ports" not in services["torchserve"]
    proxy = services["proxy"]
    assert [p.rsplit(":", 2)[-2:] for p in proxy["ports"]] == [["8443", "8443"]]
    assert proxy["environment"]["EE_PROXY_BACKEND"] == "torchserve:8080"
    assert (REPO / proxy["build"]["context"] / "Dockerfile").is_file()
    (certs,) = [v for v in proxy["volumes"] if v.startswith("./deploy/proxy/certs:")]
    assert certs.split(":")[1] == str(PurePosixPath(_presetenv()["EE_PROXY_CERT"]).parent)
    assert "8443" in _presetenv()["EE_PROXY_BIND"]
    assert "/deploy/proxy/certs/*" in (REPO / ".gitignore").read_text()  # keys never committed


def test_hadolint_passes_on_the_proxy_dockerfile() -> None:
    beside = Path(sys.executable).parent / "hadolint"  # the dev extras' hadolint, as test_deploy_files uses
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if not hadolint:
        pytest.fail("`hadolint` is not installed: run `make setup`", pytrace=False)
    proc = subprocess.run([hadolint, "--no-color", "--config", str(REPO / ".hadolint.yaml"),
                           str(PROXY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (PROXY / "Dockerfile").read_text()
    assert "FROM debian:bookworm" in text and "install -y --no-install-recommends haproxy" in text
    assert re.search(r"^USER 10002", text, re.M)


def test_ci_installs_haproxy() -> None:
    makefile = (REPO / "Makefile").read_text()
    (packages,) = re.findall(r"^SYSTEM_PACKAGES :=(.*)$", makefile, re.M)
    assert "haproxy" in packages.split()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"apt-get install .*\bhaproxy\b", ci) and "command -v haproxy" in ci


# ------------------------------------------------------------------------------------- network policies
def _policies() -> dict[str, dict]:
    return {"k8s": _load(K8S / "networkpolicy.yaml")[0], "kserve": _load(KSERVE / "networkpolicy.yaml")[0]}


@pytest.mark.parametrize("where", ["k8s", "kserve"])
def test_every_ingress_peer_needs_the_named_namespace_and_the_pod_label(where: str) -> None:
    policy = _policies()[where]
    by_port = {}
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector", "podSelector"}, peer  # both, in the same peer
            namespace = peer["namespaceSelector"]["matchLabels"]
            assert set(namespace) == {"kubernetes.io/metadata.name"} and namespace["kubernetes.io/metadata.name"]
            assert peer["podSelector"]["matchLabels"]
            for port in rule["ports"]:
                by_port[port["port"]] = (namespace["kubernetes.io/metadata.name"], peer["podSelector"]["matchLabels"])
    assert by_port == {8080: ("early-exit-gateway", {"early-exit/gateway": "true"}),
                       8082: ("monitoring", {"app.kubernetes.io/name": "prometheus"})}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_egress_is_denied_except_what_the_kserve_storage_initializer_needs() -> None:
    policies = _policies()
    assert policies["k8s"]["spec"]["egress"] == []  # nothing at all, not even DNS
    dns, https = policies["kserve"]["spec"]["egress"]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}]
    (block,) = https["to"]
    assert "169.254.0.0/16" in block["ipBlock"]["except"]  # the cloud metadata service stays closed


def test_kserve_policy_selects_the_predictor_pods() -> None:
    isvc = _load(KSERVE / "inferenceservice.yaml")[0]
    selector = _policies()["kserve"]["spec"]["podSelector"]["matchLabels"]
    assert selector == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    assert "networkpolicy.yaml" in (KSERVE / "README.md").read_text()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kserve_network_policy_and_runtime_pod_match_the_kubernetes_schemas(version: str) -> None:
    kubernetes_validate.validate(_policies()["kserve"], version, strict=True)
    spec = _load(KSERVE / "servingruntime.yaml")[0]["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": spec["containers"], "volumes": spec["volumes"],
                    "automountServiceAccountToken": False}}
    kubernetes_validate.validate(pod, version, strict=True)


# ------------------------------------------------------------------------------ pod hardening, both kinds
def _pods() -> dict[str, tuple[dict, dict, list[dict]]]:
    """{where: (pod-level fields, the server container, volumes)}."""
    deployment = _load(K8S / "deployment.yaml")[0]["spec"]["template"]["spec"]
    runtime = _load(KSERVE / "servingruntime.yaml")[0]["spec"]
    predictor = _load(KSERVE / "inferenceservice.yaml")[0]["spec"]["predictor"]
    return {"k8s": (deployment, deployment["containers"][0], deployment["volumes"]),
            "kserve": (predictor, runtime["containers"][0], runtime["volumes"])}


@pytest.mark.parametrize("where", ["k8s", "kserve"])
def test_no_service_account_token_and_a_read_only_root(where: str) -> None:
    pod, container, _ = _pods()[where]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("where", ["k8s", "kserve"])
def test_every_path_torchserve_writes_is_an_emptydir_volume(where: str) -> None:
    _, container, volumes = _pods()[where]
    env = {e["name"]: e.get("value") for e in container["env"]}
    empty = {v["name"] for v in volumes if "emptyDir" in v}
    mounts = {PurePosixPath(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= empty and not any(m.get("readOnly") for m in container["volumeMounts"])

    def volume_of(path: str) -> str | None:
        p = PurePosixPath(path)
        return next((name for mount, name in mounts.items() if p == mount or mount in p.parents), None)

    writable = {name: env[name] for name in WRITABLE_VARS}
    for name, path in writable.items():
        assert volume_of(path), f"{name}={path} is on the read-only root"
    # serving.server renders config.properties into the state folder (EE_HOME) and runs TorchServe there, so
    # key_file.json (written in TorchServe's working directory) lands in EE_HOME too.
    server = (REPO / "serving" / "server.py").read_text()
    assert "proc = subprocess.run(cmd, cwd=state_dir" in server and 'CONFIG_FILE = "config.properties"' in server
    # The image's own files are named explicitly and no volume hides them.
    for name in IMAGE_FILE_VARS:
        assert env[name].startswith("/home/model-server/serving/") and not volume_of(env[name]), name
    assert volume_of("/tmp")  # java.io.tmpdir (unpacked archives), worker sockets, hsperfdata
