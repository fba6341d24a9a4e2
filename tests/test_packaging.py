"""Packaging: docker/, k8s/, the retrain workflow and the Makefile pass the offline linters and agree with the code.

The exit codes come from job.errors.ExitCode, the setting names from job.config.schema.KNOWN_ENV_VARS and the console
script from pyproject.toml, never from a second list here. The linters (hadolint, kubernetes-validate,
check-jsonschema, zizmor) are in the `test` extra; a missing one fails these tests instead of skipping them.
There is no Docker engine in CI, so the image itself is not built here (`make image-smoke` does that).
"""

from __future__ import annotations

import ast
import importlib.util
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

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from helpers import REPO

from job.config.schema import KNOWN_ENV_VARS
from job.errors import ExitCode

DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / "docker" / "job.env.example"
CONSTRAINTS = REPO / "docker" / "constraints.txt"
K8S = REPO / "k8s"
MULTINODE = K8S / "multinode" / "pytorchjob.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
WORKFLOW = REPO / ".github" / "workflows" / "retrain.yml"
K8S_BUILTIN = ["job.yaml", "configmap.yaml", "secret.example.yaml", "serviceaccount.yaml"]
# The oldest Kubernetes the manifests target (podFailurePolicy GA) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
SECRET_NAMES = {"HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
# Shapes of real credentials: Hugging Face tokens, AWS access key ids, 40-hex W&B keys.
CREDENTIAL_RE = re.compile(r"hf_[A-Za-z0-9]{20,}|(AKIA|ASIA)[A-Z0-9]{16}|\b[0-9a-f]{40}\b")
SFT_NAME_RE = re.compile(r"\bSFT_[A-Z0-9_]*[A-Z0-9]\b")
RUN_ID_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
NON_RETRYABLE = {int(c) for c in ExitCode if c != ExitCode.OK and not c.retryable}
# torch 2.8's launcher SIGKILLs its workers this long after forwarding SIGTERM (configurable only from 2.12 on).
TORCHRUN_SHUTDOWN_S = 30


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def tool(name: str) -> str:
    """A linter from the venv running the tests (where `make install` puts it), else from PATH; never a skip."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed: run `make install` (it is in pyproject's test extra)"
    return found


def run(*cmd: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def render(*extra: str) -> list[dict]:
    """k8s/render.py's manifest for a sample run, parsed."""
    out = run(sys.executable, "k8s/render.py", "--image", "registry.example.com/qwen3-sft:abc",
              "--run-id", "qwen3-sft-abc123", "--dataset", "s3://bucket/data", *extra)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    matches = [c for c in spec["containers"] if c["name"] == name]
    assert matches, f"no container named {name}"
    return matches[0]


def env_entry(c: dict, name: str) -> dict:
    matches = [e for e in c.get("env", []) if e["name"] == name]
    assert len(matches) == 1, f"{name} set {len(matches)} times in container {c['name']}"
    return matches[0]


def configmap_data() -> dict[str, str]:
    return {k: str(v) for k, v in load_yaml(K8S / "configmap.yaml")["data"].items()}


def env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """Docker env-file: (KEY=value lines, comment lines)."""
    values, comments = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            comments.append(line)
        elif line.strip():
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"not KEY=value: {line!r}"
            values[key] = value
    return values, comments


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def instruction_args(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


# ---------------------------------------------------------------------------------------------------------------
# linters, offline
# ---------------------------------------------------------------------------------------------------------------

def test_hadolint_passes_dockerfile_with_zero_warnings():
    out = run(tool("hadolint"), "--config", ".hadolint.yaml", "--format", "json", "docker/Dockerfile")
    assert out.returncode == 0 and json.loads(out.stdout) == [], out.stdout + out.stderr


def test_hadolint_ignores_are_documented():
    config = load_yaml(REPO / ".hadolint.yaml")
    text = (REPO / ".hadolint.yaml").read_text()
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for rule in config.get("ignored", []):
        assert rule in comments, f"{rule} is ignored without a reason in .hadolint.yaml"


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    out = run(tool("hadolint"), "--config", ".hadolint.yaml", "--format", "json", str(bad))
    codes = {finding["code"] for finding in json.loads(out.stdout)}
    assert out.returncode != 0 and {"DL3007", "DL3003"} <= codes, out.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict_on_builtin_kinds(version):
    out = run(tool("kubernetes-validate"), "--strict", "-k", version, *(f"k8s/{f}" for f in K8S_BUILTIN))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == len(K8S_BUILTIN), out.stdout


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    job = load_yaml(K8S / "job.yaml")
    pod_spec(job)["containers"][0]["gpus"] = 1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path))
    assert out.returncode != 0 and "gpus" in out.stdout + out.stderr


def test_rendered_manifest_validates_strictly(tmp_path):
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(render()))
    out = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path))
    assert out.returncode == 0 and out.stdout.count("passed") == 3, out.stdout + out.stderr


def test_multinode_pod_templates_validate_strictly(tmp_path):
    """The CRD itself has no bundled schema; its pod templates are core PodTemplateSpecs and must validate."""
    job = load_yaml(MULTINODE)
    docs = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"qwen3-sft-{role.lower()}"},
             "template": replica["template"]} for role, replica in job["spec"]["pytorchReplicaSpecs"].items()]
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path))
    assert out.returncode == 0 and out.stdout.count("passed") == 2, out.stdout + out.stderr


def test_workflow_matches_github_schema():
    out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))
    assert out.returncode == 0, out.stdout + out.stderr


def zizmor(path: Path) -> list[dict]:
    out = run(tool("zizmor"), "--offline", "--no-progress", "--format", "json", str(path))
    assert out.stdout.strip().startswith("["), out.stderr
    return json.loads(out.stdout)


def test_zizmor_offline_has_no_findings():
    findings = zizmor(WORKFLOW)
    assert findings == [], [(f["ident"], f["determinations"]["severity"]) for f in findings]


def test_zizmor_does_flag_injection_and_unpinned_actions(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: issues\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - uses: actions/checkout@v4\n      - run: echo ${{ github.event.issue.title }}\n")
    idents = {f["ident"] for f in zizmor(bad)}
    assert {"template-injection", "unpinned-uses"} <= idents, idents


# ---------------------------------------------------------------------------------------------------------------
# exit codes: podFailurePolicy, the wait script, the multi-node restart policy
# ---------------------------------------------------------------------------------------------------------------

def test_pod_failure_policy_fails_on_exactly_the_non_retryable_exit_codes():
    job = by_kind(render(), "Job")
    assert NON_RETRYABLE, "job.errors.ExitCode has no non-retryable failure code: nothing for FailJob"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1
    on = fail[0]["onExitCodes"]
    assert (on["containerName"], on["operator"]) == ("trainer", "In")
    assert set(on["values"]) == NON_RETRYABLE
    count = [r for r in rules if r["action"] == "Count"]
    assert len(count) == 1 and count[0]["onExitCodes"]["operator"] == "NotIn"
    assert set(count[0]["onExitCodes"]["values"]) == NON_RETRYABLE
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert [c["type"] for r in ignore for c in r["onPodConditions"]] == ["DisruptionTarget"]
    # the retryable codes, preemption included, reach backoffLimit instead of failing the Job
    assert {int(c) for c in ExitCode if c.retryable}.isdisjoint(on["values"])


def test_job_restart_settings():
    job = by_kind(render(), "Job")
    spec = job["spec"]
    assert pod_spec(job)["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0


FAKE_KUBECTL = """#!/usr/bin/env bash
# kubectl stand-in for k8s/wait.sh: FAKE_STATE=Complete|Failed|Running; FAKE_CODES = the trainer's exit code in
# each pod, oldest first (an empty line: a pod that has none).
case "$1" in
  wait)
    [[ "$*" == *condition=complete* && "$FAKE_STATE" == Complete ]] && exit 0
    [[ "$*" == *condition=failed* && "$FAKE_STATE" == Failed ]] && exit 0
    [[ "$FAKE_STATE" == Running ]] && exit 1
    exec sleep 30 ;;
  get)
    if [[ "$2" == job && "$*" == *'@.type=="Failed"'* ]]; then echo PodFailurePolicy
    elif [[ "$2" == job ]]; then
      case "$FAKE_STATE" in Complete) echo "SuccessCriteriaMet Complete" ;; Failed) echo "FailureTarget Failed" ;; esac
    else printf '%s\\n' $FAKE_CODES ""; fi ;;
esac
"""


def wait_script(tmp_path: Path, state: str, codes: str = "") -> subprocess.CompletedProcess:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "FAKE_STATE": state,
           "FAKE_CODES": codes, "WAIT_POLL_S": "0.05"}
    return run("bash", "k8s/wait.sh", "qwen3-sft-abc123", "5s", env=env, timeout=60)


@pytest.mark.parametrize("code", [c for c in ExitCode if c != ExitCode.OK], ids=lambda c: c.name)
def test_wait_script_exits_with_the_trainers_exit_code(tmp_path, code):
    # an earlier pod was preempted and retried; the newest pod's code is the Job's outcome
    out = wait_script(tmp_path, "Failed", f"{int(ExitCode.PREEMPTED)} {int(code)}")
    assert out.returncode == int(code), out.stdout + out.stderr


def test_wait_script_success_timeout_and_missing_code(tmp_path):
    assert wait_script(tmp_path, "Complete", "0").returncode == 0
    assert wait_script(tmp_path, "Failed").returncode == 1  # e.g. DeadlineExceeded before any pod exited
    assert wait_script(tmp_path, "Running").returncode == 1  # both waits timed out


def test_wait_script_explains_only_real_failure_codes():
    text = (K8S / "wait.sh").read_text()
    explained = {int(c) for c in re.findall(r"^\s+(\d+)\) meaning=", text, re.M)}
    failures = {int(c) for c in ExitCode if c != ExitCode.OK}
    assert explained and explained <= failures
    assert explained >= NON_RETRYABLE


def pytorchjob_action(exit_code: int) -> str:
    """What the training operator does with a replica's exit code under restartPolicy ExitCode."""
    if exit_code == 0:
        return "succeeded"
    return "restart" if 128 <= exit_code <= 255 else "fail"


@pytest.mark.parametrize("code", [*ExitCode, 137], ids=lambda c: getattr(c, "name", str(c)))
def test_pytorchjob_retries_exactly_what_the_job_retries(code):
    """With SFT_EXIT_CODES=kubeflow (the manifest's), each code gets the PyTorchJob action the Job's podFailurePolicy
    gives it: FailJob for the non-retryable codes, a retry for the others (and for an OOM kill, 137)."""
    from job.errors import reported_code

    style = env_entry(container(load_yaml(MULTINODE)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"],
                                "pytorch"), "SFT_EXIT_CODES")["value"]
    action = pytorchjob_action(reported_code(int(code), style))
    if code == ExitCode.OK:
        assert action == "succeeded"
    elif int(code) in NON_RETRYABLE:
        assert action == "fail"
    else:
        assert action == "restart"
    # the docs' table (docs/operations.md, Exit codes) says the same
    table = OPERATIONS.read_text().split("| Job's code |", 1)[1].split("\n\n", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith(f"| {int(code)} |"))
    assert f"| {reported_code(int(code), style)} |" in row, row


def test_multinode_pytorchjob_structure():
    job = load_yaml(MULTINODE)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    for role, replica in replicas.items():
        # the launcher exits with the contract's code: the operator decides on it (1-127 fail, 128-255 restart)
        assert replica["restartPolicy"] == "ExitCode", role
        spec = replica["template"]["spec"]
        c = container(spec, "pytorch")  # the name the training operator looks for
        # the image's own entrypoint: `qwen3-sft run` reads the operator's PET_* / MASTER_* variables itself
        assert c["command"] == ["tini", "--", "qwen3-sft"] and c["args"] == ["run"]
        assert env_entry(c, "SFT_EXIT_CODES")["value"] == "kubeflow"
        assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in c["ports"]
        run_id = env_entry(c, "SFT_RUN_ID")["valueFrom"]["fieldRef"]["fieldPath"]
        assert run_id == "metadata.labels['training.kubeflow.org/job-name']"
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == job["spec"]["nprocPerNode"]
        grace = float(env_entry(c, "SFT_PREEMPT_GRACE_S")["value"])
        assert grace < TORCHRUN_SHUTDOWN_S < spec["terminationGracePeriodSeconds"]
        check_pod_security(spec, c)
        check_volumes(spec, c)


# ---------------------------------------------------------------------------------------------------------------
# the entry point: Dockerfile ENTRYPOINT -> pyproject console script -> job.cli:main <- python -m job
# ---------------------------------------------------------------------------------------------------------------

def test_entrypoint_is_tini_then_the_console_script():
    entrypoint = json.loads(instruction_args("ENTRYPOINT")[-1])
    cmd = json.loads(instruction_args("CMD")[-1])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[:2] == ["tini", "--"] and len(entrypoint) == 3
    assert scripts[entrypoint[-1]] == "job.cli:main"
    from job.cli import COMMANDS

    assert cmd == ["run"] and cmd[0] in COMMANDS


@pytest.mark.slow
def test_python_dash_m_job_calls_the_same_main():
    tree = ast.parse((REPO / "job" / "__main__.py").read_text())
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert ("job.cli", "main") in imports and "main" in calls
    script = Path(sys.executable).parent / "qwen3-sft"
    assert script.exists(), "console script missing: run `make install`"
    via_module = run(sys.executable, "-m", "job", "--help")
    via_script = run(str(script), "--help")
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout and "qwen3-sft" in via_script.stdout


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------------------

def test_dockerfile_is_multistage_cuda12_with_the_same_version():
    args = dict(a.split("=", 1) for a in instruction_args("ARG") if "=" in a)
    froms = instruction_args("FROM")
    assert froms == ["nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS builder",
                     "nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime"]
    cuda = version_tuple(args["CUDA_VERSION"])
    assert cuda[0] == 12
    # torch's bundled CUDA runtime (its nvidia-*-cu12 wheels) is the base images' CUDA major.minor
    assert version_tuple(constraint_pins()["nvidia-cuda-runtime-cu12"])[:2] == cuda[:2]
    assert "MAX_JOBS" in args
    assert any("--from=builder /opt/venv /opt/venv" in c for c in instruction_args("COPY"))


def test_image_pins_torch_and_flash_attn_together():
    pins = constraint_pins()
    torch = version_tuple(pins["torch"])
    assert torch != (2, 9, 0) and torch <= (2, 14, 1)
    assert version_tuple(pins["torchvision"]) and version_tuple(pins["flash-attn"]) and pins["triton"]
    installs = " ".join(instruction_args("RUN"))
    assert "-c /tmp/constraints.txt flash-attn" in installs and "--no-build-isolation" in installs
    assert '".[gpu,demo,report]"' in installs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    for requirement in extras:
        name = re.split(r"[<>=!\[ ]", requirement)[0].lower()
        assert name in pins, f"{name} (gpu extra) is not pinned in docker/constraints.txt"


def test_dockerfile_runtime_user_paths_and_labels():
    env = " ".join(instruction_args("ENV"))
    assert "HF_HOME=/cache/hf" in env and "SFT_OUTPUT_DIR=/workspace/outputs" in env
    assert instruction_args("WORKDIR")[-1] == "/workspace"
    user = instruction_args("USER")[-1]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), "USER must be a numeric non-root uid (runAsNonRoot)"
    uid = int(user.split(":")[0])
    assert pod_spec(load_yaml(K8S / "job.yaml"))["securityContext"]["runAsUser"] == uid
    labels = " ".join(instruction_args("LABEL"))
    for key, arg in [("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION"), ("created", "CREATED")]:
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels


def test_no_secret_in_dockerfile_args_or_env():
    declared = [a.split("=", 1)[0] for a in instruction_args("ARG")]
    declared += [m for e in instruction_args("ENV") for m in re.findall(r"([A-Z_]+)=", e)]
    assert declared
    for name in declared:
        assert name not in SECRET_NAMES and not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", name), name
    assert not CREDENTIAL_RE.search(DOCKERFILE.read_text())


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for args in instruction_args("COPY"):
        if not args.startswith("--from"):
            sources.update(p.rstrip("/") for p in args.split()[:-1])
    assert sources == allowed


# ---------------------------------------------------------------------------------------------------------------
# settings and secrets
# ---------------------------------------------------------------------------------------------------------------

def files_naming_settings() -> list[Path]:
    return [*K8S.rglob("*.yaml"), ENV_EXAMPLE, DOCKERFILE, WORKFLOW, REPO / "Makefile"]


def test_every_sft_name_is_a_real_setting():
    used = {}
    for path in files_naming_settings():
        for name in SFT_NAME_RE.findall(path.read_text()):
            used.setdefault(name, path.relative_to(REPO))
    assert len(used) >= 10
    unknown = {name: str(path) for name, path in used.items() if name not in KNOWN_ENV_VARS}
    assert not unknown, f"not in job.config.schema.KNOWN_ENV_VARS (the job would exit 2): {unknown}"


def validate_settings(env: dict[str, str]) -> None:
    from job.cards import ModelCards
    from job.config.schema import load_settings

    load_settings(ModelCards().qwen3_vl_8b_instruct, env)  # raises ConfigError listing every problem


def test_configmap_and_env_example_are_valid_configurations():
    run_env = {"SFT_RUN_ID": "qwen3-sft-abc123", "SFT_DATASET_URI": "s3://bucket/data"}
    validate_settings({**configmap_data(), **run_env})
    values, _ = env_file(ENV_EXAMPLE)
    validate_settings(values)
    c = container(load_yaml(MULTINODE)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"], "pytorch")
    literals = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    validate_settings({**configmap_data(), **run_env, **literals})


def test_termination_grace_covers_the_preemption_save():
    grace = pod_spec(load_yaml(K8S / "job.yaml"))["terminationGracePeriodSeconds"]
    preempt = float(configmap_data()["SFT_PREEMPT_GRACE_S"])
    assert grace >= preempt + 15, "leave a margin after SFT_PREEMPT_GRACE_S for the exit itself"


def test_no_secret_values_in_configmap_or_env_example():
    data = configmap_data()
    assert not SECRET_NAMES & set(data)
    assert not any(CREDENTIAL_RE.search(v) for v in data.values())
    values, comments = env_file(ENV_EXAMPLE)
    assert not SECRET_NAMES & set(values), "secrets in job.env.example must stay commented-out placeholders"
    placeholders = {m.group(1): m.group(2) for line in comments
                    if (m := re.match(r"#\s*([A-Z_]+)=(.*)", line)) and m.group(1) in SECRET_NAMES}
    assert {"HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(placeholders)
    assert all(re.fullmatch(r"<[^>]+>", v) for v in placeholders.values()), placeholders
    assert not CREDENTIAL_RE.search(ENV_EXAMPLE.read_text())
    secret = load_yaml(K8S / "secret.example.yaml")
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}


def test_job_reads_secrets_from_the_secret_and_settings_from_the_configmap():
    job = by_kind(render(), "Job")
    c = container(pod_spec(job), "trainer")
    assert c["envFrom"] == [{"configMapRef": {"name": load_yaml(K8S / "configmap.yaml")["metadata"]["name"]}}]
    secret = load_yaml(K8S / "secret.example.yaml")
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env_entry(c, name)["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_run_id_comes_from_the_job_name_label():
    job = by_kind(render(), "Job")
    assert job["metadata"]["name"] == "qwen3-sft-abc123"
    c = container(pod_spec(job), "trainer")
    assert env_entry(c, "SFT_RUN_ID")["valueFrom"]["fieldRef"]["fieldPath"] == RUN_ID_LABEL
    assert "SFT_RUN_ID" not in configmap_data()
    # The Job's uid: a retried pod of a SFT_RESUME=never run continues it (docs/operations.md, "Preemption and resume").
    launch = env_entry(c, "SFT_LAUNCH_ID")["valueFrom"]["fieldRef"]["fieldPath"]
    assert launch == "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert "SFT_LAUNCH_ID" not in configmap_data()


# ---------------------------------------------------------------------------------------------------------------
# the single-GPU Job's pod
# ---------------------------------------------------------------------------------------------------------------

def check_pod_security(spec: dict, c: dict) -> None:
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def check_volumes(spec: dict, c: dict) -> None:
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    shm = mounts["/dev/shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert "/cache" in mounts and "/workspace" in mounts  # HF_HOME=/cache/hf, SFT_OUTPUT_DIR=/workspace/outputs
    assert "nvidia.com/gpu" in c["resources"]["limits"]
    assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    assert spec.get("nodeSelector") or spec.get("tolerations")


def test_job_pod_security_volumes_and_gpu():
    job = by_kind(render(), "Job")
    spec = pod_spec(job)
    c = container(spec, "trainer")
    check_pod_security(spec, c)
    check_volumes(spec, c)
    assert c["image"] == "registry.example.com/qwen3-sft:abc"
    assert env_entry(c, "SFT_DATASET_URI")["value"] == "s3://bucket/data"


# ---------------------------------------------------------------------------------------------------------------
# render.py and kustomization.yaml
# ---------------------------------------------------------------------------------------------------------------

def test_kustomization_lists_the_resources_and_an_image_override():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["resources"] == ["serviceaccount.yaml", "configmap.yaml", "job.yaml"]
    assert all((K8S / r).exists() for r in kustomization["resources"])
    job = load_yaml(K8S / "job.yaml")
    assert kustomization["images"][0]["name"] == container(pod_spec(job), "trainer")["image"]


def test_render_applies_kustomize_images_then_the_run():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    renderer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(renderer)
    kustomization, docs = renderer.load_kustomization()
    renderer.apply_kustomize_images(docs, kustomization["images"])
    override = kustomization["images"][0]
    assert (
        container(pod_spec(by_kind(docs, "Job")), "trainer")["image"] == f"{override['newName']}:{override['newTag']}"
    )
    digest = "sha256:" + "ab" * 32
    docs = renderer.render(f"registry.example.com/qwen3-sft@{digest}", "run-1", "s3://b/d", namespace="ml")
    c = container(pod_spec(by_kind(docs, "Job")), "trainer")
    assert env_entry(c, "SFT_IMAGE_DIGEST")["value"] == digest
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}


def test_render_refuses_a_run_id_that_cannot_name_a_job():
    out = run(sys.executable, "k8s/render.py", "--image", "i", "--run-id", "Run_1", "--dataset", "s3://b/d")
    assert out.returncode != 0 and "DNS-1123" in out.stderr


def test_render_env_exports_the_configmap():
    out = run(sys.executable, "k8s/render.py", "env")
    assert out.returncode == 0, out.stderr
    exported = dict(shlex.split(line)[1].split("=", 1) for line in out.stdout.splitlines())
    assert exported == configmap_data()


# ---------------------------------------------------------------------------------------------------------------
# Makefile
# ---------------------------------------------------------------------------------------------------------------

def test_make_help_lists_the_packaging_targets():
    out = run("make", "--no-print-directory", "help")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"install", "demo", "test", "lint", "image", "push", "submit", "preflight", "image-smoke"} <= listed
