"""serving.server and serving.client helpers that need no running TorchServe."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from serving import client, server

REPO = Path(__file__).resolve().parents[2]


def _properties(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


def test_shipped_config_keeps_token_auth_on_loopback_and_prometheus() -> None:
    props = _properties(REPO / "serving" / "config.properties")
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    assert all(props[k].startswith("http://127.0.0.1:") for k in ("inference_address", "management_address",
                                                                  "metrics_address"))
    assert props["metrics_mode"] == "prometheus" and props["metrics_config"] == "serving/metrics.yaml"
    assert props["decode_input_request"] == "false"  # the handler sees raw bytes (payload size, bad JSON)
    assert "model_store" in props and "load_models" in props


def test_render_config_replaces_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    out = server.render_config(REPO / "serving" / "config.properties", tmp_path / "c.properties",
                               {"inference_address": "http://127.0.0.1:1234", "initial_worker_port": "4321",
                                "new_key": "x"})
    props = _properties(out)
    template = _properties(REPO / "serving" / "config.properties")
    assert props["inference_address"] == "http://127.0.0.1:1234" and props["initial_worker_port"] == "4321"
    assert props["new_key"] == "x" and props["disable_token_authorization"] == "false"
    assert {k: v for k, v in props.items() if k not in ("inference_address", "initial_worker_port", "new_key")} == {
        k: v for k, v in template.items() if k not in ("inference_address", "initial_worker_port")}


def test_served_name_comes_from_the_archive_not_its_file_name(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "renamed.mar", "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "mnist"}}))
    assert server._model_names(tmp_path, ["renamed.mar"]) == ["mnist"]
    assert server._model_names(tmp_path, ["all"]) == ["mnist"]
    assert server._model_names(tmp_path, ["other=renamed.mar"]) == ["other"]
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    with pytest.raises(server.ServerError, match="broken.mar"):
        server._model_names(tmp_path, ["broken.mar"])


def test_load_failure_reads_only_what_this_start_appended(tmp_path: Path) -> None:
    ts_log, model_log = tmp_path / "ts_log.log", tmp_path / "model_log.log"
    ts_log.write_text("x Load model failed: m\nx Load model failed: m\n")
    model_log.write_text("t [INFO ] W-1-m-stdout MODEL_LOG - early_exit.manifest.ManifestError: old\n")
    offsets = server._log_sizes(tmp_path)
    assert server._load_failure(tmp_path, offsets) is None  # a previous start's failures do not count
    with open(ts_log, "a") as f:
        f.write("x Load model failed: m\nx Load model failed: m\n")
    with open(model_log, "a") as f:
        f.write("t [INFO ] W-1-m-stdout MODEL_LOG - ValueError: unknown handler option(s) ['x']\n")
    assert server._load_failure(tmp_path, offsets) == "ValueError: unknown handler option(s) ['x']"


def test_free_ports_are_distinct() -> None:
    ports = server.Ports.free()
    values = [ports.inference, ports.management, ports.metrics, ports.grpc_inference, ports.grpc_management]
    assert len(set(values)) == 5 and not set(values) & set(range(ports.worker, ports.worker + 16))


def test_read_key(tmp_path: Path) -> None:
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "m"}}))
    assert server.read_key(tmp_path) == "abc" and server.read_key(tmp_path, server.KeyKind.MANAGEMENT) == "m"
    assert client.read_token(tmp_path / "key_file.json") == "abc"
    assert client.read_token(tmp_path / "missing.json") is None
    with pytest.raises(server.ServerError, match="does not exist"):
        server.read_key(tmp_path / "nowhere")


@pytest.mark.parametrize("body, kind", [(b"\x89PNG\r\n\x1a\n...", "image/png"), (b"\xff\xd8\xff\xe0", "image/jpeg"),
                                        (b'{"data": []}', "application/json")])
def test_client_content_type(body: bytes, kind: str) -> None:
    assert client.guess_content_type(body) == kind


def test_properties_are_read_as_java_reads_them_and_rendered_once(tmp_path: Path) -> None:
    template = tmp_path / "t.properties"
    template.write_text("# a: comment\nenable_model_api=false\nmetrics_mode : log\n! other comment\n"
                        "enable_model_api: true\n")
    assert server.read_properties(template) == {"enable_model_api": "true", "metrics_mode": "log"}  # last wins
    out = server.render_config(template, tmp_path / "o.properties", {"enable_model_api": "false", "x": "1"})
    assert out.read_text().splitlines() == ["# a: comment", "enable_model_api=false", "metrics_mode : log",
                                            "! other comment", "x=1"]
    assert server.read_properties(tmp_path / "missing") == {}


def test_server_is_read_back_from_its_rendered_config(tmp_path: Path) -> None:
    launch = server.Launch(tmp_path, ("all",), tmp_path / "state", server.Ports(18080, 18081, 18082), bind="0.0.0.0",
                           token_auth=False)
    launch.render()
    back = server.Server.from_state_dir(tmp_path / "state")
    assert (back.ports.inference, back.ports.management, back.ports.metrics) == (18080, 18081, 18082)
    assert back.token_auth is False and back.management_url == "http://127.0.0.1:18081"
    with pytest.raises(server.ServerError, match="no config.properties"):
        server.Server.from_state_dir(tmp_path / "elsewhere")


def test_token_auth_modes_are_a_closed_set() -> None:
    assert server.TokenAuth.parse("on") is server.TokenAuth.ON
    with pytest.raises(server.ServerError, match="EE_TOKEN_AUTH must be 'on' or 'off-behind-gateway', got 'off'"):
        server.TokenAuth.parse("off")


PIN_A, PIN_B = "a" * 64, "0123456789abcdef" * 4


def test_pins_parse_the_deployment_value_or_the_explicit_opt_out() -> None:
    assert server.parse_pins(f"mnist.mar={PIN_A}, other.mar={PIN_B}") == {"mnist.mar": PIN_A, "other.mar": PIN_B}
    assert server.parse_pins(" unpinned ") is None
    for bad, message in (("", "EE_MODEL_SHA256 is not set"), ("mnist.mar", "expected NAME.mar="),
                         (f"mnist={PIN_A}", "expected NAME.mar="), (f"mnist.mar={PIN_A.upper()}", "expected"),
                         (f"../x.mar={PIN_A}", "expected"), (f"mnist.mar={PIN_A[:-1]}", "expected"),
                         (f"mnist.mar={PIN_A},mnist.mar={PIN_B}", "pins mnist.mar twice")):
        with pytest.raises(server.ServerError, match=message.replace(".", r"\.")):
            server.parse_pins(bad)


def test_archive_pins_are_checked_against_the_served_files(tmp_path: Path) -> None:
    (tmp_path / "mnist.mar").write_bytes(b"archive")
    (tmp_path / "other.mar").write_bytes(b"other")
    line = server.pin_line([tmp_path / "mnist.mar", tmp_path / "other.mar"])
    assert line.startswith("EE_MODEL_SHA256=mnist.mar=") and ",other.mar=" in line
    pins = line.split("=", 1)[1]
    assert server.archive_pin_problems(tmp_path, ["all"], pins) == []
    assert server.archive_pin_problems(tmp_path, ["mnist.mar"], pins) == []  # other.mar pinned, present, not served
    assert server.archive_pin_problems(tmp_path, ["all"], "unpinned") == []
    only_mnist = pins.split(",")[0]
    (problem,) = server.archive_pin_problems(tmp_path, ["all"], only_mnist)
    assert "pins no sha256 for other.mar" in problem
    (tmp_path / "mnist.mar").write_bytes(b"swapped")  # same name, other bytes
    (problem,) = server.archive_pin_problems(tmp_path, ["m=mnist.mar"], pins)
    assert "mnist.mar has sha256" in problem and "refusing to serve a replaced archive" in problem
    (tmp_path / "other.mar").unlink()
    assert any("pins other.mar, which is not in" in p for p in server.archive_pin_problems(tmp_path, ["all"], pins))


def test_start_refuses_a_replaced_archive_before_starting_torchserve(tmp_path: Path) -> None:
    (tmp_path / "mnist.mar").write_bytes(b"swapped")
    with pytest.raises(server.ServerError, match="refusing to serve a replaced archive"):
        server.start_server(tmp_path, ["mnist.mar"], tmp_path / "state", model_sha256=f"mnist.mar={PIN_A}")
    assert not (tmp_path / "state" / "config.properties").exists(), "refused before anything was rendered"


def test_rendered_config_allows_only_store_archives_and_an_empty_read_only_workflow_store(tmp_path: Path) -> None:
    store = tmp_path / "model-store.v1"  # regex characters in the path are escaped
    store.mkdir()
    (store / "b.mar").write_bytes(b"b")
    (store / "a.mar").write_bytes(b"a")
    launch = server.Launch(store, ("all",), tmp_path / "state")
    props = server.read_properties(launch.render())
    assert props["allowed_urls"] == "file://" + str(store).replace("-", "\\\\-").replace(".", "\\\\.") + \
        "/[^/]+\\\\.mar"
    assert props["enable_envvars_config"] == "false" and props["load_models"] == "a.mar,b.mar"
    workflows = Path(props["workflow_store"])
    assert workflows == tmp_path / "state" / "workflow-store" and not any(workflows.iterdir())
    assert workflows.stat().st_mode & 0o777 == 0o555
    assert server.workflow_store_problems(workflows) == []
    workflows.chmod(0o755)
    assert "must not be writable" in server.workflow_store_problems(workflows)[0]


def test_torchserve_gets_no_ts_variables_nor_the_launchers_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_DISABLE_TOKEN_AUTHORIZATION", "true")
    monkeypatch.setenv("TS_ALLOWED_URLS", ".*")
    monkeypatch.setenv("PYTHONPATH", "/home/model-server")  # would shadow the archive's own packages
    env = server._env(tmp_path)
    assert not [k for k in env if k.startswith("TS_")] and env["TMPDIR"] == str(tmp_path / "tmp")
    assert "PYTHONPATH" not in env
