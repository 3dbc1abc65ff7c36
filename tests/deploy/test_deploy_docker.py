"""The Dockerfiles, linted as text (there is no Docker engine here): pinned base images, dependencies only from
the pinned requirements.txt, a non-root user, a health check for the controller, no secrets."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from deploy_helpers import CHART, REPO

DOCKER = REPO / "deploy" / "docker"
FILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("kind", sorted(FILES))
def test_base_image_is_pinned(kind):
    froms = [args.split()[0] for word, args in instructions(FILES[kind]) if word == "FROM"]
    assert froms
    for image in froms:
        name, _, tag = image.partition(":")
        assert "@sha256:" in image or re.fullmatch(r"\d+(\.\d+)+[-.\w]*", tag), f"{image}: pin an exact version"
    if kind == "gpu":
        assert froms[-1].startswith("nvidia/cuda:")


@pytest.mark.parametrize("kind", sorted(FILES))
def test_dependencies_come_from_the_pins(kind):
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\[\],-]+==[\w.+-]+", line), f"requirements.txt: {line} is not pinned"
            name, _, version = line.partition("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    copied = [args for word, args in instructions(FILES[kind]) if word == "COPY"]
    assert any(a.split()[0] == "requirements.txt" for a in copied)
    installs = 0
    for word, args in instructions(FILES[kind]):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            installs += 1
            packages = [w for w in words[2:] if not w.startswith("-") and not w.startswith("http")]
            if "-r" in words:
                assert words[words.index("-r") + 1] == "requirements.txt"
                continue
            if "--no-deps" in words and packages == ["."]:
                continue
            for spec in packages:  # anything else must repeat a pin from requirements.txt exactly
                name, _, version = spec.partition("==")
                assert pins.get(name.lower()) == version, f"{kind}: {spec} is not the pin in requirements.txt"
    assert installs >= 2


@pytest.mark.parametrize("kind", sorted(FILES))
def test_runs_as_a_non_root_user_matching_the_chart(kind):
    steps = instructions(FILES[kind])
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in {"0", "root"}
    last_user = max(i for i, (w, _) in enumerate(steps) if w == "USER")
    assert all(w != "RUN" for w, _ in steps[last_user:]), "nothing may run as root after USER"
    chart_uid = yaml.safe_load((CHART / "templates" / "_helpers.tpl").read_text().split(
        'define "flowbp.podSecurityContext" -}}')[1].split("{{- end")[0])["runAsUser"]
    assert users[-1] == str(chart_uid)


def test_controller_image_has_a_health_check_on_the_charts_port_and_command():
    steps = instructions(FILES["cpu"])
    [check] = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "/healthz" in check and "--interval" in check
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    env = " ".join(args for word, args in steps if word == "ENV")
    assert f"FLOWBP_PORT={values['controller']['port']}" in env and "FLOWBP_HOST=0.0.0.0" in env
    [cmd] = [args for word, args in steps if word == "CMD"]
    assert yaml.safe_load(cmd) == values["controller"]["command"]


@pytest.mark.parametrize("kind", sorted(FILES))
def test_no_secrets_in_the_image(kind):
    text = FILES[kind].read_text()
    for word, args in instructions(FILES[kind]):
        if word in {"ENV", "ARG", "LABEL"}:
            # a variable whose name ends in TOKEN, SECRET, PASSWORD, API_KEY... (TOKENIZERS_PARALLELISM is fine)
            assert not re.search(r"(?:^|\s)\w*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIALS?)=", args,
                                 re.I), args
        if word in {"COPY", "ADD"}:
            assert not re.search(r"\.env\b|id_rsa|\.pem\b|\.netrc|credentials", args), args
    assert not re.search(r"AKIA[0-9A-Z]{16}|ghp_[0-9A-Za-z]{20,}|hf_[0-9A-Za-z]{20,}|-----BEGIN", text)
    ignore = (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignore)


@pytest.mark.parametrize("kind", sorted(FILES))
def test_copied_paths_exist(kind):
    for word, args in instructions(FILES[kind]):
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"{kind}: COPY {source} names a path the repository lacks"


def test_gpu_image_ties_torchs_cuda_build_to_the_base_image():
    steps = instructions(FILES["gpu"])
    [base] = [args for word, args in steps if word == "FROM"]
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-", base)  # its CUDA_VERSION and NVIDIA_REQUIRE_CUDA come with it
    install = next(args for word, args in steps if word == "RUN" and "-r requirements.txt" in args)
    assert "python check_torch_cuda.py" in install
    check = (DOCKER / "check_torch_cuda.py").read_text()
    assert 'os.environ["CUDA_VERSION"]' in check and "torch.version.cuda" in check


@pytest.mark.parametrize("kind", sorted(FILES))
def test_the_venv_is_not_chowned_into_a_second_layer(kind):
    for word, args in instructions(FILES[kind]):
        if word == "RUN" and "chown" in args:
            assert "/opt/venv" not in args, args
