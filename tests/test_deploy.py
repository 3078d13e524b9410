"""Deployment files: the Dockerfile, docker/compose*.yml, docker/.env.example, .dockerignore.

No Docker engine is needed. The files are parsed and checked against each other and against
the README's "Deploy with Docker" section; hadolint lints the Dockerfile; the image's health
check command runs against a real ``segal-backend`` started with the image's environment.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from ls_harness import BackgroundProcess, free_port, wait_for_http

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yml"
COMPOSE_GPU = REPO / "docker" / "compose.gpu.yml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
README = REPO / "README.md"
LABEL_STUDIO_IMAGE = "heartexlabs/label-studio:1.23"
BACKEND_PORT = 9090
MODEL_VOLUME_PATH = "/data/models"
SETUP_COMMAND = "./run.sh setup"
VARIABLE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- helpers -----------------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def table_names(section: str) -> list[str]:
    """The backticked names in the first column of the section's markdown table rows."""
    names = []
    for line in section.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2 and "`" in cells[1]:
            names += re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", cells[1])
    return names


def load_compose(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{path.name} has no services mapping"
    return data


def compose_variables(path: Path) -> set[str]:
    """Every variable a compose file mentions: environment keys and ${...} references."""
    data = load_compose(path)
    names = {match.group(1) for match in VARIABLE_REFERENCE.finditer(path.read_text())}
    for service in data["services"].values():
        names |= set(environment(service))
    return names


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def container_ports(service: dict) -> list[int]:
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(VARIABLE_REFERENCE.sub("x", str(entry)).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def volume_targets(service: dict) -> dict[str, str]:
    """container path -> source (a named volume or a host path)."""
    targets = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            targets[entry["target"]] = entry.get("source", "")
        else:
            source, target = str(entry).split(":")[:2]
            targets[target] = source
    return targets


def stages() -> list[list[dict]]:
    """The Dockerfile's instructions (comments dropped), split into build stages."""
    result: list[list[dict]] = []
    for instruction in DockerfileParser(path=str(DOCKERFILE)).structure:
        if instruction["instruction"] == "COMMENT":
            continue
        if instruction["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    assert result, "Dockerfile has no FROM"
    return result


def instructions(stage: list[dict], name: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == name]


def exec_form(value: str) -> list[str]:
    """The JSON (exec) form of CMD / ENTRYPOINT / HEALTHCHECK CMD, as an argv."""
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), value
    return argv


def final_env() -> dict[str, str]:
    env = {}
    for value in instructions(stages()[-1], "ENV"):
        for token in shlex.split(value):
            key, _, val = token.partition("=")
            env[key] = val
    return env


def healthcheck_argv() -> list[str]:
    (value,) = instructions(stages()[-1], "HEALTHCHECK")
    _options, cmd, rest = value.partition("CMD")
    assert cmd, f"HEALTHCHECK without CMD: {value!r}"
    return exec_form(rest.strip())


# --- compose -----------------------------------------------------------------------------


def test_compose_names_label_studio_and_the_backend_with_their_ports():
    services = load_compose(COMPOSE)["services"]
    assert set(services) == {"label-studio", "segal"}, sorted(services)
    assert services["label-studio"]["image"].startswith(LABEL_STUDIO_IMAGE), services["label-studio"]["image"]
    assert 8080 in container_ports(services["label-studio"])
    assert BACKEND_PORT in container_ports(services["segal"])
    build = services["segal"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO and (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_compose_wires_the_backend_to_label_studio_with_one_token():
    services = load_compose(COMPOSE)["services"]
    backend, label_studio = environment(services["segal"]), environment(services["label-studio"])
    assert backend["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    # One variable feeds Label Studio's preset token and the backend's key, and it is required.
    key = VARIABLE_REFERENCE.fullmatch(backend["LABEL_STUDIO_API_KEY"])
    token = VARIABLE_REFERENCE.fullmatch(label_studio["LABEL_STUDIO_USER_TOKEN"])
    assert key and token and key.group(1) == token.group(1) == "LABEL_STUDIO_API_KEY"
    assert key.group(2) == token.group(2) == ":?", "the API token must be required (${VAR:?message})"
    assert label_studio["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # The backend sits on the compose network's private addresses.
    assert label_studio["ML_BLOCK_LOCAL_IP"] == "false"
    assert label_studio["SSRF_PROTECTION_ENABLED"] == "false"


def test_compose_keeps_both_data_dirs_on_named_volumes():
    data = load_compose(COMPOSE)
    services = data["services"]
    declared = set(data.get("volumes") or {})
    label_studio_data = volume_targets(services["label-studio"]).get("/label-studio/data")
    models = volume_targets(services["segal"]).get(MODEL_VOLUME_PATH)
    assert label_studio_data in declared and models in declared, (label_studio_data, models, declared)
    assert environment(services["segal"])["MODEL_DIR"] == MODEL_VOLUME_PATH


def test_compose_holds_no_secret():
    secrets = {"LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS"}
    seen = set()
    for path in (COMPOSE, COMPOSE_GPU):
        for service in load_compose(path)["services"].values():
            for key, value in environment(service).items():
                if key in secrets:
                    seen.add(key)
                    assert VARIABLE_REFERENCE.fullmatch(value), f"{path.name}: {key} is a literal, not a ${{VAR}}"
    assert seen == secrets, sorted(secrets - seen)


def test_every_deploy_variable_of_the_readme_is_in_the_compose_files():
    documented = table_names(readme_section("Deploy with Docker"))
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "TORCH_INDEX_URL"} <= set(documented)
    present = compose_variables(COMPOSE) | compose_variables(COMPOSE_GPU)
    settings = table_names(readme_section("Using it with Label Studio"))
    expanded = []
    for name in documented:
        expanded += [s for s in settings if s.startswith(name[:-1])] if name.endswith("*") else [name]
    assert len(expanded) > len(documented), "SEGAL_* should expand to the Settings table's SEGAL_ names"
    missing = sorted(set(expanded) - present)
    assert not missing, f"documented in the README's deploy section but absent from docker/compose*.yml: {missing}"


def test_env_example_fills_exactly_what_compose_reads():
    example = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    referenced, required = set(), set()
    for path in (COMPOSE, COMPOSE_GPU):
        for match in VARIABLE_REFERENCE.finditer(path.read_text()):
            referenced.add(match.group(1))
            if match.group(2) in ("?", ":?"):
                required.add(match.group(1))
    assert required <= example, f"required by compose, missing from .env.example: {sorted(required - example)}"
    assert example <= referenced, f"in .env.example but read by no compose file: {sorted(example - referenced)}"
    # The secrets ship empty, so compose's ${VAR:?} stops a start with the example values.
    values = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line[:1].isalpha())
    assert values["LABEL_STUDIO_PASSWORD"] == values["LABEL_STUDIO_API_KEY"] == ""


def test_gpu_override_reserves_a_gpu_and_a_cuda_torch():
    segal = load_compose(COMPOSE_GPU)["services"]["segal"]
    devices = segal["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", []) and device.get("driver") == "nvidia" for device in devices)
    args = segal["build"]["args"]
    assert "TORCH_INDEX_URL" in args and "cpu" not in str(args["TORCH_INDEX_URL"])
    assert "BASE_IMAGE" in args
    assert "SEGAL_DEVICE" in environment(segal)


# --- Dockerfile --------------------------------------------------------------------------


def test_the_image_installs_with_the_readme_setup_script_only():
    assert SETUP_COMMAND in readme_section("Deploy with Docker")
    runs = [run for stage in stages() for run in instructions(stage, "RUN")]
    assert SETUP_COMMAND in runs, f"no `RUN {SETUP_COMMAND}` in the Dockerfile: {runs}"
    for run in runs:
        assert not re.search(r"\bpip3?\s+install\b|-m\s+pip\b", run), f"install outside run.sh: {run!r}"


def test_the_setup_layer_copies_what_pip_install_e_needs():
    """The setup RUN sees only what was copied before it: the files pyproject.toml reads and
    each package's __init__.py; each package's folder is copied after it."""
    build = next(stage for stage in stages() if SETUP_COMMAND in instructions(stage, "RUN"))
    index = next(i for i, item in enumerate(build) if item["instruction"] == "RUN" and item["value"] == SETUP_COMMAND)

    def copied(items):
        return {
            src.rstrip("/") for item in items if item["instruction"] == "COPY" for src in item["value"].split()[:-1]
        }

    before, after = copied(build[:index]), copied(build[index + 1 :])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"pyproject.toml", "constraints.txt", "run.sh", pyproject["project"]["readme"]} <= before, before
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(
        path.parent.name
        for path in REPO.glob("*/__init__.py")
        if any(fnmatch.fnmatch(path.parent.name, pattern) for pattern in patterns)
    )
    assert packages, patterns
    for package in packages:
        assert f"{package}/__init__.py" in before, f"{package}/__init__.py is not copied before {SETUP_COMMAND}"
        assert package in after, f"{package}/ is not copied after {SETUP_COMMAND}"


def test_the_cpu_image_takes_torch_from_the_cpu_index_and_the_pins_allow_it():
    build = next(stage for stage in stages() if SETUP_COMMAND in instructions(stage, "RUN"))
    args = dict(value.split("=", 1) for value in instructions(build, "ARG") if "=" in value)
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu"), args
    assert any("PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}" in value for value in instructions(build, "ENV"))
    # ==2.13.0 admits both 2.13.0+cpu (CPU index) and 2.13.0 (PyPI, CUDA); a local version
    # pin (+cpu) would break the GPU build.
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    for name in ("torch", "torchvision"):
        assert re.fullmatch(r"\d+(\.\d+)+", pins[name]), f"{name}=={pins[name]} must be a plain public version"


def test_the_runtime_stage_serves_segal_backend_as_a_non_root_user():
    final = stages()[-1]
    env = final_env()
    assert str(BACKEND_PORT) in " ".join(instructions(final, "EXPOSE")).split()
    assert env["PORT"] == str(BACKEND_PORT)
    (user,) = instructions(final, "USER")[-1:]
    assert user.split(":")[0] not in ("root", "0"), user
    volumes = [path for value in instructions(final, "VOLUME") for path in exec_form(value)]
    assert env["MODEL_DIR"] == MODEL_VOLUME_PATH and MODEL_VOLUME_PATH in volumes, (env, volumes)
    (cmd,) = instructions(final, "CMD") or instructions(final, "ENTRYPOINT")
    assert exec_form(cmd)[0] == "segal-backend"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["segal-backend"] == "backend.server:main"
    # Writable places for a user who cannot write the code: numba's cache and gunicorn's home.
    assert not env["NUMBA_CACHE_DIR"].startswith("/app"), env["NUMBA_CACHE_DIR"]
    assert env["HOME"].startswith("/home/")
    argv = healthcheck_argv()
    copies = [value.split() for value in instructions(final, "COPY")]
    assert any(dst == argv[1] and (REPO / src).is_file() for *_, src, dst in copies), (argv, copies)


def test_dockerignore_keeps_local_state_out_but_not_what_the_build_copies():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    assert not any(pattern.startswith("!") for pattern in patterns), "exceptions are not handled by this test"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            for pattern in patterns
            for prefix in prefixes
        )

    for path in (".venv", ".venv-label-studio", ".git", "test-artifacts", "models", "model/__pycache__", "docker/.env"):
        assert ignored(path), f"{path} is sent to the Docker build"
    for stage in stages():
        for item in stage:
            if item["instruction"] == "COPY" and not item["value"].startswith("--from"):
                for source in item["value"].split()[:-1]:
                    assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: it comes with the test extra (`./run.sh test` installs it).")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# --- the image's health check, against a real server ------------------------------------


def test_healthcheck_command_passes_on_a_live_backend_and_fails_otherwise(tmp_path, artifacts_dir):
    """The HEALTHCHECK's exact command, run against ``segal-backend`` started with the image's
    environment (paths moved into tmp_path) and basic auth on: healthy with the credentials,
    unhealthy without them and once the server is gone."""
    port = free_port()
    image_env = final_env()
    env = {
        **os.environ,
        **{key: value for key, value in image_env.items() if key not in ("PATH", "HOME")},
        "PORT": str(port),
        "MODEL_DIR": str(tmp_path / "models"),
        "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
        "BASIC_AUTH_USER": "deploy",
        "BASIC_AUTH_PASS": "check-me",
    }
    app_root = "/app/"
    argv = [sys.executable if arg == "python" else arg.replace(app_root, f"{REPO}/", 1) for arg in healthcheck_argv()]
    assert Path(argv[1]).is_file(), argv

    def check(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**env, **extra_env}, capture_output=True, text=True, timeout=30, check=False)

    log = artifacts_dir / "segal-backend-deploy.log"
    log.unlink(missing_ok=True)
    server = BackgroundProcess([Path(sys.executable).parent / "segal-backend"], log, env=env).start()
    try:
        auth = {"Authorization": "Basic ZGVwbG95OmNoZWNrLW1l"}  # deploy:check-me
        wait_for_http(f"http://127.0.0.1:{port}/health", 120, server, headers=auth)
        healthy = check({})
        assert healthy.returncode == 0, healthy.stderr
        asked = [line for line in server.log_path.read_text().splitlines() if "Python-urllib" in line]
        assert asked and '"GET /health HTTP/1.1" 200' in asked[-1], asked
        wrong = check({"BASIC_AUTH_PASS": "wrong"})
        assert wrong.returncode == 1 and "401" in wrong.stderr, wrong.stderr
    finally:
        server.stop()
    gone = check({})
    assert gone.returncode == 1 and "refused" in gone.stderr.lower(), gone.stderr
