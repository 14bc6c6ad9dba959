"""Every shell example of the README and docs/*.md still works against the repository (no server needed).

Each ```bash block is split into commands (continuation lines joined, comments dropped, `a && b` split), and
each command goes to the checker of its program:

  make ...                 `make -n ...` (dry run) succeeds
  python -m M ... / torchrun ... -m M ...
                           `python -m M ... --help` succeeds and lists every --option the example uses
  curl ...                 a body (--data-binary, -d, ...) comes with an explicit Content-Type, the URL's path
                           is one the server has, predictions carry the bearer token
  docker / docker compose  the Dockerfile, build args, exposed ports, compose files and services, and the
                           entrypoint subcommand the example names exist (no Docker engine here)
  kubectl                  the kustomization and the files the example names exist and parse
  prometheus / promtool    the flags are in `prometheus --help`; promtool's checks run for real
  mkdir, cp, sed           the repository files they read exist (and sed's pattern occurs in its file)
  cat > /tmp/F <<'EOF'     a here-document writes a file of the user's own, outside the repository; a preset
                           (F ends in .yaml) loads with training.config.load_config under its own file name
  NAME=$(cmd), export NAME=value
                           cmd is checked as above; an exported variable is one the project reads

A command no checker knows fails the test: give the new example a checker here.
tests/integration/test_doc_examples_live.py sends the curl and client examples to a real TorchServe, and runs
the sections of LIVE_SECTIONS as written, one bash script each (their `make` commands need the files the
section's earlier commands write and a trained run, so they are run there instead of dry-run here).
"""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest
import yaml

from tests.promtools import require_binary

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# README sections whose ```bash blocks tests/integration/test_doc_examples_live.py runs from start to end.
LIVE_SECTIONS = {"Your own network and photos"}
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1\s*$")
CONTAINER_HOME = "/home/model-server/"  # the image's WORKDIR: docker/entrypoint.sh is copied below it
BODY_FLAGS = {"-d", "--data", "--data-binary", "--data-raw", "--data-urlencode", "-T", "--upload-file", "-F",
              "--form"}
SERVER_PATHS = {  # TorchServe's APIs, by the port serving/config.properties gives them
    8080: [r"/ping", r"/predictions/[\w.-]+(/[\w.-]+)?"],
    8081: [r"/models(/[\w.-]+)*", r"/token"],
    8082: [r"/metrics"],
}


@dataclass(frozen=True)
class Example:
    """One command of a ```bash block: where it is, its text (no comment, continuations joined), the `## `
    section it is in, and for a here-document (`cat > F <<'EOF'`) the lines up to its terminator."""

    path: Path
    line: int
    text: str
    section: str = ""
    heredoc: str | None = None

    @property
    def script(self) -> str:
        """The command as bash reads it (a here-document with its lines and terminator)."""
        if self.heredoc is None:
            return self.text
        match = HEREDOC.search(self.text)
        assert match, self.text
        return f"{self.text}\n{self.heredoc}{match.group(2)}"

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def argv(self) -> list[str]:
        """Words as the shell splits them (quotes removed; $VAR and $(...) left as written); a redirect ends it."""
        words = shlex.split(self.text)
        return words[:words.index(">")] if ">" in words else words


def _split_outside_quotes(text: str) -> list[str]:
    """`text` cut at `&&` and at a `#` comment, both outside quotes."""
    parts, current, quote = [], "", ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (not current or current[-1].isspace()):
            break
        elif text.startswith("&&", i):
            parts.append(current)
            current, i = "", i + 2
            continue
        current += c
        i += 1
    return [p.strip() for p in [*parts, current] if p.strip()]


def bash_examples(paths: list[Path] = DOCS) -> list[Example]:
    examples = []
    for path in paths:
        in_block, pending, start, section = False, "", 0, ""
        heredoc: tuple[Example, str, list[str]] | None = None  # (the command, its terminator, lines so far)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if heredoc is not None:
                command, end, lines = heredoc
                if line.strip() == end:
                    examples.append(Example(path, command.line, command.text, section, "".join(lines)))
                    heredoc = None
                else:
                    lines.append(line + "\n")
                continue
            if line.strip().startswith("```"):
                in_block = line.strip() == "```bash" and not in_block
                continue
            if not in_block:
                if line.startswith("## "):
                    section = line[3:].strip()
                continue
            start = start or number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            parts = [Example(path, start, part, section) for part in _split_outside_quotes(pending + line)]
            match = HEREDOC.search(parts[-1].text) if parts else None
            if match:
                heredoc = (parts.pop(), match.group(2), [])
            examples += parts
            pending, start = "", 0
        assert heredoc is None, f"{path.name}:{heredoc[0].line}: here-document without its terminator"
    return examples


# ----------------------------------------------------------------------------- checkers
def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _options(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def check_make(ex: Example, argv: list[str]) -> None:
    proc = _run(["make", "-n", *argv[1:]])
    assert proc.returncode == 0, f"{ex.where}: `make -n {' '.join(argv[1:])}` failed:\n{proc.stderr}"


@functools.lru_cache(maxsize=None)
def _module_help(module: str, first_arg: str) -> str:
    """`python -m module [first_arg] --help` (first_arg may be a subcommand)."""
    proc = _run([sys.executable, "-m", module, *([first_arg] if first_arg else []), "--help"])
    assert proc.returncode == 0, f"`python -m {module} {first_arg} --help` failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _check_module(ex: Example, module: str, args: list[str]) -> None:
    first = args[0] if args and not args[0].startswith("-") else ""
    help_text = _module_help(module, first)
    missing = {o for o in _options(args) if o not in help_text}
    assert not missing, f"{ex.where}: `python -m {module}` has no option {sorted(missing)}"


def check_python(ex: Example, argv: list[str]) -> None:
    assert argv[1] == "-m", f"{ex.where}: run project code as `python -m <module>`"
    assert argv[0] in {"python", ".venv/bin/python"}, f"{ex.where}: unexpected interpreter {argv[0]}"
    _check_module(ex, argv[2], argv[3:])


@functools.lru_cache(maxsize=None)
def _torchrun_help() -> str:
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--help"])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def check_torchrun(ex: Example, argv: list[str]) -> None:
    m = argv.index("-m")
    missing = {o for o in _options(argv[1:m]) if o not in _torchrun_help()}
    assert not missing, f"{ex.where}: torchrun has no option {sorted(missing)}"
    _check_module(ex, argv[m + 1], argv[m + 2:])


def curl_request(argv: list[str]) -> tuple[dict[str, str], list[str], str]:
    """(headers with lower-cased names, body flags used, URL) of a curl command line."""
    headers, body_flags, urls = {}, [], []
    words = iter(argv[1:])
    for word in words:
        if word in ("-H", "--header"):
            name, _, value = next(words).partition(":")
            headers[name.strip().lower()] = value.strip()
        elif word in BODY_FLAGS:
            body_flags.append(word)
            next(words)
        elif word.startswith("http://") or word.startswith("https://"):
            urls.append(word)
        elif word.startswith("-") and word not in ("-s", "-S", "-sS", "-i", "-v", "-f", "--fail"):
            raise AssertionError(f"curl option {word} is not known to this test: add it")
    (url,) = urls
    return headers, body_flags, url


def check_curl(ex: Example, argv: list[str]) -> None:
    headers, body_flags, url = curl_request(argv)
    if body_flags:
        assert "content-type" in headers, (
            f"{ex.where}: {body_flags[0]} without -H 'Content-Type: ...' makes curl send "
            "application/x-www-form-urlencoded, which the server refuses (415)")
        assert headers["content-type"] in {"image/png", "image/jpeg", "application/json"}, ex.where
    parts = urlsplit(url)
    assert parts.port in SERVER_PATHS, f"{ex.where}: port {parts.port} is none of the server's"
    assert any(re.fullmatch(p, parts.path) for p in SERVER_PATHS[parts.port]), \
        f"{ex.where}: the server has no {parts.path} on port {parts.port}"
    if parts.path.startswith("/predictions/"):
        assert headers.get("authorization", "").startswith("Bearer "), f"{ex.where}: token auth is on"
        assert body_flags, f"{ex.where}: a prediction needs a body"
    if "x-compute-budget" in headers:
        float(headers["x-compute-budget"])


def _dockerfile_args() -> set[str]:
    return set(re.findall(r"^ARG (\w+)", (REPO / "Dockerfile").read_text(), re.M))


def _exposed_ports() -> set[str]:
    return {p for line in re.findall(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.M)
            for p in line.split()}


def _check_container_command(ex: Example, command: list[str]) -> None:
    """A command run inside the image: a file the image copies from the repository, and its subcommand."""
    assert command[0].startswith(CONTAINER_HOME), f"{ex.where}: {command[0]} is not in the image"
    script = REPO / command[0][len(CONTAINER_HOME):]
    assert script.is_file(), f"{ex.where}: {script} does not exist"
    if len(command) > 1:
        assert re.search(rf"^\s*{re.escape(command[1])}\)", script.read_text(), re.M), \
            f"{ex.where}: {script.name} has no subcommand {command[1]}"


def _words_after_options(words: list[str], with_value: set[str]) -> list[str]:
    """Positional words of a docker command (its options, with their values, removed)."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in with_value:
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


def _check_compose(ex: Example, args: list[str]) -> None:
    files = [args[i + 1] for i, a in enumerate(args) if a == "-f"] or ["docker-compose.yml"]
    services: set[str] = set()
    for name in files:
        assert (REPO / name).is_file(), f"{ex.where}: {name} does not exist"
        services |= set(yaml.safe_load((REPO / name).read_text())["services"])
    positional = _words_after_options(args, {"-f"})
    verb, rest = positional[0], positional[1:]
    assert verb in {"up", "down", "restart", "exec", "logs", "ps"}, f"{ex.where}: docker compose {verb}?"
    if verb in {"exec", "restart", "logs"} and rest:
        assert rest[0] in services, f"{ex.where}: no service {rest[0]}"
    if verb == "exec":
        _check_container_command(ex, rest[1:])


def check_docker(ex: Example, argv: list[str]) -> None:
    verb, args = argv[1], argv[2:]
    if verb == "compose":
        _check_compose(ex, args)
    elif verb == "build":
        for i, a in enumerate(args):
            if a == "--build-arg":
                assert args[i + 1].split("=")[0] in _dockerfile_args(), f"{ex.where}: no ARG {args[i + 1]}"
        (context,) = _words_after_options(args, {"-t", "--build-arg", "-f"})
        assert (REPO / context / "Dockerfile").is_file(), ex.where
    elif verb == "push":
        assert "early-exit-serve" in args[-1], ex.where
    elif verb == "run":
        for i, a in enumerate(args):
            if a == "-p":
                assert args[i + 1].split(":")[-1] in _exposed_ports(), f"{ex.where}: {args[i + 1]} not EXPOSEd"
        assert re.fullmatch(r"early-exit-serve:(cpu|gpu)", args[-1]), ex.where
    elif verb == "exec":
        container, *command = _words_after_options(args, {"-u", "-e", "-w"})
        _check_container_command(ex, command)
    else:
        pytest.fail(f"{ex.where}: no check for `docker {verb}`: add one to {Path(__file__).name}")


def check_kubectl(ex: Example, argv: list[str]) -> None:
    if argv[1:3] == ["apply", "-k"]:
        kustomization = yaml.safe_load((REPO / argv[3] / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            assert list(yaml.safe_load_all((REPO / argv[3] / resource).read_text())), f"{ex.where}: {resource}"
    elif argv[1:3] == ["apply", "-f"]:
        files = [argv[i + 1] for i, a in enumerate(argv) if a == "-f"]
        for f in files:
            docs = list(yaml.safe_load_all((REPO / f).read_text()))
            assert docs and all(d.get("apiVersion") and d.get("kind") for d in docs), f"{ex.where}: {f}"
    elif argv[1:3] == ["create", "configmap"]:
        files = [a.split("=", 1)[1] for a in argv if a.startswith("--from-file=")]
        assert files and all((REPO / f).is_file() for f in files), f"{ex.where}: {files}"
    else:
        pytest.fail(f"{ex.where}: no check for `kubectl {argv[1]}`: add one to {Path(__file__).name}")


def check_prometheus(ex: Example, argv: list[str]) -> None:
    proc = _run([require_binary("prometheus"), "--help"], timeout=30)
    missing = {o for o in _options(argv[1:]) if o not in proc.stdout + proc.stderr}
    assert not missing, f"{ex.where}: prometheus has no flag {sorted(missing)}"


def check_promtool(ex: Example, argv: list[str]) -> None:
    proc = _run([require_binary("promtool"), *argv[1:]], timeout=60)
    assert proc.returncode == 0, f"{ex.where}: {ex.text}\n{proc.stdout}\n{proc.stderr}"


def _repo_files(words: list[str]) -> list[Path]:
    """The words that name repository files (relative paths; /tmp and such are the example's own)."""
    return [REPO / w for w in words if not w.startswith(("-", "/")) and "/" in w]


def check_mkdir(ex: Example, argv: list[str]) -> None:
    assert all(w.startswith(("-", "/tmp/")) for w in argv[1:]), f"{ex.where}: mkdir outside /tmp"


def check_cp(ex: Example, argv: list[str]) -> None:
    for path in _repo_files(argv[1:-1]):
        assert path.exists(), f"{ex.where}: {path.relative_to(REPO)} does not exist"


def check_sed(ex: Example, argv: list[str]) -> None:
    (script, *files) = [w for w in argv[1:] if not w.startswith("-")]
    for path in _repo_files(files):
        assert path.is_file(), f"{ex.where}: {path.relative_to(REPO)} does not exist"
        if script.startswith("s/"):
            assert re.search(script.split("/")[1], path.read_text()), \
                f"{ex.where}: sed's pattern {script.split('/')[1]!r} no longer occurs in {path.name}"


def check_cat(ex: Example, argv: list[str]) -> None:
    """`cat > /tmp/F <<'EOF'`: the user's own file, outside the repository; a preset loads under F's name."""
    from training.config import load_config

    words = shlex.split(ex.text)
    assert ex.heredoc is not None and words[1] == ">", f"{ex.where}: only `cat > FILE <<'EOF'` is checked"
    target = Path(words[2])
    assert target.is_absolute() and not target.is_relative_to(REPO), f"{ex.where}: {target} is not outside the repo"
    if target.suffix == ".yaml":
        with tempfile.TemporaryDirectory() as folder:
            preset = Path(folder) / target.name
            preset.write_text(ex.heredoc)
            cfg = load_config(str(preset))
        assert cfg.name == target.stem, f"{ex.where}: the run is named {cfg.name}, not after {target.name}"


def check_export(ex: Example, argv: list[str]) -> None:
    name = argv[1].split("=", 1)[0]
    readers = [REPO / "docker-compose.yml", REPO / "Makefile"]
    assert any(re.search(rf"\$\{{?{name}\b", p.read_text()) for p in readers), \
        f"{ex.where}: nothing in the project reads {name}"


CHECKERS: dict[str, Callable[[Example, list[str]], None]] = {
    "make": check_make, "python": check_python, ".venv/bin/python": check_python, "torchrun": check_torchrun,
    "curl": check_curl, "docker": check_docker, "kubectl": check_kubectl, "prometheus": check_prometheus,
    "promtool": check_promtool, "mkdir": check_mkdir, "cp": check_cp, "sed": check_sed, "export": check_export,
    "cat": check_cat,
}


def check(ex: Example) -> None:
    assignment = re.fullmatch(r"(\w+)=\$\((.*)\)", ex.text)
    if assignment:  # NAME=$(command): check the command
        check(Example(ex.path, ex.line, assignment.group(2)))
        return
    argv = ex.argv
    if ex.section in LIVE_SECTIONS and argv[0] == "make":
        return  # run for real, after the section's earlier commands, by tests/integration/test_doc_examples_live.py
    checker = CHECKERS.get(argv[0])
    if checker is None:
        pytest.fail(f"{ex.where}: no check for `{argv[0]}` ({ex.text}): add one to {Path(__file__).name}",
                    pytrace=False)
    checker(ex, argv)


EXAMPLES = bash_examples()


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e.where} {e.text.split()[0]}" for e in EXAMPLES])
def test_shell_example(example: Example) -> None:
    check(example)


# ----------------------------------------------------------------------------- the extraction itself
def test_extraction_joins_continuations_and_splits_commands(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```bash\nmake a   # comment\ncurl -H 'X: #1' \\\n     http://h:8080/ping && make b\n"
                   "```\n```python\nnot = 'bash'\n```\n```bash\n# only a comment\n```\n")
    assert [(e.line, e.text) for e in bash_examples([doc])] == [
        (3, "make a"), (4, "curl -H 'X: #1'       http://h:8080/ping"), (4, "make b")]


def test_the_docs_have_examples_of_every_kind() -> None:
    programs = {e.argv[0] for e in EXAMPLES if "=$(" not in e.text}
    assert {"make", "curl", "docker", "kubectl", ".venv/bin/python"} <= programs


@pytest.mark.parametrize("command, complaint", [
    ("curl -H 'Authorization: Bearer k' --data-binary @x.png http://127.0.0.1:8080/predictions/mnist",
     "Content-Type"),
    ("curl -H 'Content-Type: image/png' -H 'Authorization: Bearer k' --data-binary @x.png "
     "http://127.0.0.1:8080/prediction/mnist", "no /prediction/mnist"),
    ("curl -H 'Content-Type: image/png' --data-binary @x.png http://127.0.0.1:8080/predictions/mnist",
     "token auth"),
])
def test_curl_check_catches_what_real_clients_trip_over(command: str, complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint):
        check(Example(REPO / "README.md", 1, command))


def test_an_unknown_command_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="no check for `wget`"):
        check(Example(REPO / "README.md", 1, "wget http://example.org"))


def test_extraction_keeps_a_here_document_whole_and_names_the_section(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("## First\n```bash\nmake a\n```\n## Second one\n\n```bash\ncat > /tmp/p.yaml <<'EOF'\n"
                   "iterations: 3   # a comment stays\nEOF\nmake b PRESET=/tmp/p.yaml\n```\n")
    examples = bash_examples([doc])
    assert [(e.line, e.section, e.text, e.heredoc) for e in examples] == [
        (3, "First", "make a", None),
        (8, "Second one", "cat > /tmp/p.yaml <<'EOF'", "iterations: 3   # a comment stays\n"),
        (11, "Second one", "make b PRESET=/tmp/p.yaml", None)]
    assert examples[1].script == "cat > /tmp/p.yaml <<'EOF'\niterations: 3   # a comment stays\nEOF"
    doc.write_text("```bash\ncat > /tmp/p.yaml <<EOF\niterations: 3\n```\n")
    with pytest.raises(AssertionError, match="here-document without its terminator"):
        bash_examples([doc])


@pytest.mark.parametrize("text, body, complaint", [
    ("cat > /tmp/my-photos.yaml <<'EOF'", "iterations: 3\nno_such_key: 1\n", "unknown config key 'no_such_key'"),
    ("cat > /tmp/my photos.yaml <<'EOF'", "iterations: 3\n", "may hold only letters"),
    (f"cat > {REPO}/mine.yaml <<'EOF'", "iterations: 3\n", "is not outside the repo"),
    ("cat > /tmp/p.yaml <<'EOF'", "name: other\n", "the run is named other, not after p.yaml"),
])
def test_the_here_document_check_loads_the_preset_it_writes(text: str, body: str, complaint: str) -> None:
    from training.config import ConfigError

    with pytest.raises((AssertionError, ConfigError), match=complaint):
        check(Example(REPO / "README.md", 1, text.replace("my photos", "'my photos'"), "", body))


def test_the_readme_s_own_preset_section_is_run_live_and_writes_its_preset_outside_the_repository() -> None:
    section = [e for e in EXAMPLES if e.section in LIVE_SECTIONS]
    assert {e.section for e in section} == LIVE_SECTIONS
    programs = [e.argv[0] for e in section]
    assert programs.count("make") >= 3 and "curl" in programs and "cat" in programs
    (preset,) = [e for e in section if e.heredoc is not None]
    assert any(f"PRESET={shlex.split(preset.text)[2]}" in e.text for e in section), "make is given that preset"


def test_the_default_preset_names_the_default_archive_and_the_client_s_model() -> None:
    """make serve serves model_store/<default preset>.mar; the client's default model is that name."""
    from serving.client import DEFAULT_MODEL
    from training.config import DEFAULT_PRESET

    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^PRESET \?= {re.escape(DEFAULT_PRESET)}$", makefile, re.M)
    assert DEFAULT_MODEL == DEFAULT_PRESET
    proc = _run(["make", "-n", "serve"])
    assert proc.returncode == 0 and f"--models {DEFAULT_PRESET}.mar" in proc.stdout, proc.stderr
