"""docker/entrypoint.sh and the `python -m serving.server` subcommands it runs, without a server: `check` renders
the container's config and refuses unsafe or broken ones (one line each, exit 2), keeps token authorization on
unless the gateway mode is chosen, and `healthcheck` fails with one line when nothing answers. The start,
healthcheck and stop against a real TorchServe are in tests/integration/test_container_commands.py."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving import server
from tests.promtools import REPO

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def _entrypoint(tmp_path: Path, *args: str, base_config: Path | None = None, metrics: Path | None = None,
                store_files: tuple[str, ...] = ("mnist.mar",), **env: str) -> subprocess.CompletedProcess:
    """Run the entrypoint as the image does, with this test's Python first on PATH and EE_HOME in tmp_path.
    EE_MODEL_SHA256 pins the store's archives as they are unless `env` sets it."""
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    for name in store_files:
        (store / name).write_bytes(b"PK")
    pins = server.pin_line([store / name for name in store_files]).split("=", 1)[1] if store_files else "unpinned"
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EE_", "TS_"))},
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "EE_HOME": str(tmp_path),
        "EE_BASE_CONFIG": str(base_config or REPO / "serving" / "config.properties"),
        "EE_METRICS_CONFIG": str(metrics or REPO / "serving" / "metrics.yaml"),
        "EE_LOG_CONFIG": str(REPO / "serving" / "log4j2.xml"),
        "EE_MODEL_STORE": str(store),
        "EE_MODEL_SHA256": pins,
        **env,
    }
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=environ, capture_output=True, text=True,
                          timeout=60)


def _props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def test_entrypoint_runs_only_serving_server_subcommands() -> None:
    """The entrypoint holds no configuration rules of its own: each subcommand is one serving.server call."""
    text = ENTRYPOINT.read_text()
    calls = [line.split("python -m serving.server", 1)[1].split()[0] for line in text.splitlines()
             if "exec python -m serving.server" in line]
    assert calls == ["start", "check", "healthcheck", "key"]
    assert "<<" not in text, "no heredoc programs in the entrypoint"


def test_entrypoint_check_passes_on_the_repository_config(tmp_path: Path) -> None:
    proc = _entrypoint(tmp_path, "check")
    assert proc.returncode == 0, proc.stderr
    assert "config check passed" in proc.stderr
    props = _props(proc.stdout)
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["disable_token_authorization"] == "false"
    assert props["metrics_mode"] == "prometheus" and props["model_store"] == str(tmp_path / "store")
    # only archives in the store can be registered, no workflow can be, TS_* variables cannot override the file
    assert props["allowed_urls"] == server.allowed_urls(tmp_path / "store")
    assert props["workflow_store"] == str(tmp_path / "workflow-store") and props["enable_envvars_config"] == "false"
    assert not any((tmp_path / "workflow-store").iterdir()) and (tmp_path / "workflow-store").stat().st_mode & 0o222 == 0
    assert props["load_models"] == "mnist.mar"  # "all", expanded to the archives whose sha256 was checked
    assert "sha256 pinned" in proc.stderr
    assert (tmp_path / "config.properties").read_text() == proc.stdout
    # every key appears once: the base config's values for the container's keys were replaced
    keys = [line.split("=", 1)[0] for line in proc.stdout.splitlines() if "=" in line and not line.startswith("#")]
    assert len(keys) == len(set(keys))


def _variant(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["no_archive", "named_archive_missing", "model_api_on", "model_api_on_colon_syntax",
                                  "metrics_mode_log", "metric_not_declared", "metric_dimensions_differ",
                                  "bad_token_mode", "missing_log_config", "no_pin", "malformed_pin",
                                  "swapped_archive", "unpinned_archive", "pinned_archive_missing",
                                  "workflow_store_not_empty", "workflow_store_writable"])
def test_entrypoint_check_refuses_unsafe_or_broken_configs(tmp_path: Path, case: str) -> None:
    base = (REPO / "serving" / "config.properties").read_text()
    metrics_yaml = (REPO / "serving" / "metrics.yaml").read_text()
    kwargs: dict = {}
    expected = {
        "no_archive": "no .mar archive",
        "named_archive_missing": "models names other.mar",
        "model_api_on": "enable_model_api=true",
        "model_api_on_colon_syntax": "enable_model_api=true",
        "metrics_mode_log": "metrics_mode must be prometheus",
        "metric_not_declared": "EarlyExitCount",
        "metric_dimensions_differ": "declares StageRuns",
        "bad_token_mode": "EE_TOKEN_AUTH must be",
        "missing_log_config": "missing file",
        "no_pin": "EE_MODEL_SHA256 is not set",
        "malformed_pin": "EE_MODEL_SHA256: expected NAME.mar=<64 hex digits>",
        "swapped_archive": "refusing to serve a replaced archive",
        "unpinned_archive": "EE_MODEL_SHA256 pins no sha256 for mnist.mar",
        "pinned_archive_missing": "EE_MODEL_SHA256 pins other.mar, which is not in",
        "workflow_store_not_empty": "must be empty",
        "workflow_store_writable": "must not be writable",
    }[case]
    if case == "no_archive":
        kwargs["store_files"] = ()
    elif case == "named_archive_missing":
        kwargs["EE_MODELS"] = "mnist=other.mar"
    elif case == "model_api_on":
        kwargs["base_config"] = _variant(tmp_path, "c.properties", base + "\nenable_model_api=true\n")
    elif case == "model_api_on_colon_syntax":  # java.util.Properties also reads `key: value`
        kwargs["base_config"] = _variant(tmp_path, "c.properties", base + "\nenable_model_api: true\n")
    elif case == "metrics_mode_log":
        kwargs["base_config"] = _variant(tmp_path, "c.properties", base.replace("metrics_mode=prometheus",
                                                                                "metrics_mode=log"))
    elif case == "metric_not_declared":
        kwargs["metrics"] = _variant(tmp_path, "m.yaml", metrics_yaml.replace("name: EarlyExitCount", "name: Renamed"))
    elif case == "metric_dimensions_differ":  # the handler would refuse to load with this file
        text = metrics_yaml.replace('- name: StageRuns\n      unit: count\n      dimensions: ["Stage", *model_name, *level]',
                                    '- name: StageRuns\n      unit: count\n      dimensions: [*model_name, *level, "Stage"]')
        assert text != metrics_yaml
        kwargs["metrics"] = _variant(tmp_path, "m.yaml", text)
    elif case == "bad_token_mode":
        kwargs["EE_TOKEN_AUTH"] = "off"
    elif case == "missing_log_config":
        kwargs["EE_LOG_CONFIG"] = str(tmp_path / "nowhere.xml")
    elif case == "no_pin":
        kwargs["EE_MODEL_SHA256"] = ""
    elif case == "malformed_pin":
        kwargs["EE_MODEL_SHA256"] = "mnist-quick.mar=CHANGE-ME"
    elif case == "swapped_archive":  # the pin of other bytes under the same name
        kwargs["EE_MODEL_SHA256"] = f"mnist.mar={hashlib.sha256(b'the archive that was pinned').hexdigest()}"
    elif case == "unpinned_archive":
        kwargs["EE_MODEL_SHA256"] = f"other.mar={hashlib.sha256(b'PK').hexdigest()}"
    elif case == "pinned_archive_missing":
        digest = hashlib.sha256(b"PK").hexdigest()
        kwargs["EE_MODEL_SHA256"] = f"mnist.mar={digest},other.mar={digest}"
    elif case in ("workflow_store_not_empty", "workflow_store_writable"):
        workflows = tmp_path / "workflows"
        workflows.mkdir()
        if case == "workflow_store_not_empty":
            (workflows / "w.war").write_bytes(b"PK")
            workflows.chmod(0o555)
        kwargs["EE_WORKFLOW_STORE"] = str(workflows)
    proc = _entrypoint(tmp_path, "check", **kwargs)
    assert proc.returncode == server.EXIT_CHECK_FAILED, proc.stderr
    assert "config check FAILED" in proc.stderr and expected in proc.stderr, proc.stderr
    assert proc.stdout == "", "a refused configuration is not printed as the effective one"
    if case in ("no_pin", "swapped_archive"):
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_unpinned_is_an_explicit_opt_out_with_a_warning(tmp_path: Path) -> None:
    proc = _entrypoint(tmp_path, "check", EE_MODEL_SHA256="unpinned")
    assert proc.returncode == 0, proc.stderr
    assert "sha256 NOT checked" in proc.stderr


def test_ts_environment_variables_cannot_reopen_what_the_config_closes(tmp_path: Path) -> None:
    """A base config asking for environment overrides is rendered with enable_envvars_config=false (TorchServe
    then ignores TS_*, seen with TS_DISABLE_TOKEN_AUTHORIZATION); a launch that sets it true is refused."""
    base = (REPO / "serving" / "config.properties").read_text() + "\nenable_envvars_config=true\n"
    proc = _entrypoint(tmp_path, "check", base_config=_variant(tmp_path, "c.properties", base),
                       TS_DISABLE_TOKEN_AUTHORIZATION="true")
    assert proc.returncode == 0, proc.stderr
    assert _props(proc.stdout)["enable_envvars_config"] == "false"
    assert _props(proc.stdout)["disable_token_authorization"] == "false"
    store = tmp_path / "store"
    launch = server.Launch(store, ("mnist.mar",), tmp_path / "state", model_sha256=server.UNPINNED,
                           extra_config={"enable_envvars_config": "true"})
    (problem,) = [e for e in server.check_launch(launch, {"TS_DISABLE_TOKEN_AUTHORIZATION": "true"})
                  if "enable_envvars_config" in e]
    assert "TS_DISABLE_TOKEN_AUTHORIZATION" in problem


def test_entrypoint_keeps_token_auth_on_even_if_the_base_config_disables_it(tmp_path: Path) -> None:
    base = (REPO / "serving" / "config.properties").read_text() + "\ndisable_token_authorization=true\n"
    proc = _entrypoint(tmp_path, "check", base_config=_variant(tmp_path, "c.properties", base))
    assert proc.returncode == 0, proc.stderr
    assert _props(proc.stdout)["disable_token_authorization"] == "false"
    gateway = _entrypoint(tmp_path, "check", EE_TOKEN_AUTH="off-behind-gateway")
    assert gateway.returncode == 0 and "WARNING: token authorization is OFF" in gateway.stderr
    assert _props(gateway.stdout)["disable_token_authorization"] == "true"


def test_entrypoint_healthcheck_fails_with_one_line_without_a_server(tmp_path: Path) -> None:
    never_started = _entrypoint(tmp_path, "healthcheck")
    assert never_started.returncode == 1 and never_started.stderr.startswith("unhealthy: no config.properties")
    assert len(never_started.stderr.splitlines()) == 1
    from tests.promtools import free_port

    port = free_port()  # rendered, but nothing listens on its management port
    assert _entrypoint(tmp_path, "check", EE_MANAGEMENT_PORT=str(port)).returncode == 0
    no_key = _entrypoint(tmp_path, "healthcheck")
    assert no_key.returncode == 1 and "key_file.json does not exist" in no_key.stderr, no_key.stderr
    assert _entrypoint(tmp_path, "check", EE_MANAGEMENT_PORT=str(port),
                       EE_TOKEN_AUTH="off-behind-gateway").returncode == 0
    refused = _entrypoint(tmp_path, "healthcheck")
    assert refused.returncode == 1 and refused.stderr.startswith(f"unhealthy: http://127.0.0.1:{port}"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1
