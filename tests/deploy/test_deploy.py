"""The deployment: both kustomize overlays render, every object validates
against the Kubernetes schemas (strict), the Dockerfiles pass hadolint, and
the properties that matter are there (GPU limits, probes, headless Services,
HPAs, PDBs, grace periods above the drain time, non-root), and internal
traffic is locked: only the gateway reaches the model services (a
NetworkPolicy; compose: an internal network, no published port), all of them
share the internal token from a Secret or an env file, and no secret is on
any command line. The async jobs API's Redis: a StatefulSet on a volume
with an append-only file fsynced on every write, reached by the gateway
alone, the webhook secret a file from a Secret; the optional components
(KEDA on the job queue, a managed Redis) render and keep those properties."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
KUBE_VERSION = "1.32.0"
MODEL_STAGES = ["text-encoder", "denoiser", "autoencoder"]
STAGES = MODEL_STAGES + ["gateway"]


def kustomize(path):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required (scripts/setup.sh installs it)"
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(overlay):
    return kustomize(K8S / "overlays" / overlay)


def render_with(tmp, overlay, components):
    """An overlay with optional components, as an operator's own overlay
    would take them (kustomize wants relative paths)."""
    rel = lambda p: os.path.relpath(p, tmp)
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "sdserve",
        "resources": [rel(K8S / "overlays" / overlay)],
        "components": [rel(K8S / "components" / c) for c in components],
    }))
    return kustomize(tmp)


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request):
    return request.param, render(request.param)


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name):
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deploy):
    return deploy["spec"]["template"]["spec"]["containers"][0]


def env(deploy):
    return {e["name"]: e.get("value") for e in container(deploy).get("env", [])}


# Custom resources the Kubernetes schemas do not know: checked field by
# field in their own tests instead.
NOT_IN_THE_SCHEMAS = {"keda.sh"}


def validate_strictly(docs):
    """Validate every object the schemas know; the custom ones skipped."""
    skipped = []
    for d in docs:
        if d["apiVersion"].split("/")[0] in NOT_IN_THE_SCHEMAS:
            skipped.append(d["kind"])
            continue
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    return skipped


def test_every_object_validates_strictly(overlay):
    name, docs = overlay
    assert len(docs) > 15
    assert validate_strictly(docs) == [], "the plain overlays need no CRDs"


def test_each_stage_has_a_deployment_service_and_pdb(overlay):
    _, docs = overlay
    for stage in STAGES:
        one(docs, "Deployment", stage)
        one(docs, "Service", stage)
        pdb = one(docs, "PodDisruptionBudget", stage)
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == stage


def test_model_services_are_headless_and_the_gateway_resolves_them(overlay):
    _, docs = overlay
    gateway_env = env(one(docs, "Deployment", "gateway"))
    for stage in MODEL_STAGES:
        svc = one(docs, "Service", stage)
        assert svc["spec"]["clusterIP"] == "None", f"{stage} must be headless"
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        key = "SD_" + stage.upper().replace("-", "_")
        assert gateway_env[key] == f"dns://{stage}:{port}"
    assert one(docs, "Service", "gateway")["spec"].get("clusterIP") != "None"


def test_probes_grace_periods_and_non_root(overlay):
    _, docs = overlay
    drain = int(one(docs, "ConfigMap", "sdserve-config")["data"]["SD_DRAIN_SECS"])
    for stage in STAGES:
        d = one(docs, "Deployment", stage)
        c = container(d)
        assert "grpc" in c["readinessProbe"], f"{stage}: native gRPC readiness probe"
        assert "livenessProbe" in c
        if stage in MODEL_STAGES:
            assert "grpc" in c["startupProbe"], f"{stage}: loading needs a startup probe"
            assert "grpc" in c["livenessProbe"]
        own_drain = int(env(d).get("SD_DRAIN_SECS") or drain)
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > own_drain
        pod_sc = d["spec"]["template"]["spec"]["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_autoscalers_for_denoiser_and_gateway(overlay):
    _, docs = overlay
    for name in ["denoiser", "gateway"]:
        hpa = one(docs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] >= 1


def test_weights_come_from_a_volume_filled_by_a_job(overlay):
    _, docs = overlay
    pvc = one(docs, "PersistentVolumeClaim", "sd-weights")
    job = one(docs, "Job", "sd-weights-download")
    job_env = {e["name"]: e for e in container(job)["env"]}
    assert job_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    for stage in MODEL_STAGES:
        vols = one(docs, "Deployment", stage)["spec"]["template"]["spec"]["volumes"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"] for v in vols)


def test_observability_wiring(overlay):
    _, docs = overlay
    one(docs, "Deployment", "otel-collector")
    one(docs, "Service", "otel-collector")
    assert "scrape.yaml" in one(docs, "ConfigMap", "sdserve-prometheus-scrape")["data"]
    assert one(docs, "ConfigMap", "sdserve-config")["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4317")
    for stage in STAGES:
        d = one(docs, "Deployment", stage)
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert env(d)["OTEL_SERVICE_NAME"] == stage


def test_gpu_limits_and_placement():
    gpu, cpu = render("gpu"), render("cpu")
    den = one(gpu, "Deployment", "denoiser")
    assert container(den)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert den["spec"]["template"]["spec"]["nodeSelector"] == {"sdserve.io/pool": "denoiser-gpu"}
    assert env(den)["SD_DEVICE"] == "cuda" and env(den)["SD_PRECISION"] == "fp16"
    for stage in ["text-encoder", "autoencoder"]:
        d = one(gpu, "Deployment", stage)
        assert d["spec"]["template"]["spec"]["nodeSelector"] == {"sdserve.io/pool": "shared-gpu"}
        assert container(d)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in d["spec"]["template"]["spec"]["tolerations"])
    assert "nvidia.com/gpu" not in str(one(gpu, "Deployment", "gateway"))
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu)
    assert env(one(cpu, "Deployment", "denoiser"))["SD_DEVICE"] == "cpu"
    assert container(den)["image"].endswith(":cuda")
    assert container(one(cpu, "Deployment", "denoiser"))["image"].endswith(":cpu")


def test_dockerfiles_pass_hadolint_and_are_lean():
    venv_bin = Path(sys.executable).parent
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(venv_bin))
    assert hadolint, "hadolint is required (installed by scripts/setup.sh)"
    files = sorted(DOCKER.glob("*.Dockerfile"))
    assert {f.stem for f in files} == set(STAGES)
    r = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in files:
        text = f.read_text()
        assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, f"{f.name}: multi-stage"
        assert "USER 10001" in text, f"{f.name}: non-root"
        assert "sdctl" in text and "HEALTHCHECK" in text, f"{f.name}: health probe inside"
    gateway = "\n".join(
        line for line in (DOCKER / "gateway.Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert "torch" not in gateway and "python" not in gateway.lower(), "the gateway image carries no libtorch"
    for stage in MODEL_STAGES:
        assert "TORCH_VARIANT" in (DOCKER / f"{stage}.Dockerfile").read_text(), "CPU and CUDA variants"


def test_compose_runs_the_stack_on_one_gpu_machine():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == set(STAGES) | {"redis"}
    devices = services["denoiser"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    gw = services["gateway"]["environment"]
    for stage in MODEL_STAGES:
        assert gw["SD_" + stage.upper().replace("-", "_")].startswith(f"http://{stage}:")


# A secret on a command line: a flag that takes one (not its `-file`
# form), a NAME=value of one, an expansion of a secret variable
# (`$(SD_INTERNAL_TOKEN)` in Kubernetes args, `$HF_TOKEN` in a shell), or a
# Hugging Face token itself.
SECRET_ON_ARGV = re.compile(
    r"--[\w-]*(token|api-keys?|password|secret)(?!-file)\b"
    r"|\b\w*(TOKEN|KEYS?|PASSWORD|SECRET)="
    r"|\$\(?\{?\w*(TOKEN|KEYS?|PASSWORD|SECRET)\b"
    r"|\bhf_[A-Za-z0-9]{8,}",
    re.IGNORECASE,
)


def test_the_secret_pattern_catches_secrets_and_passes_the_rest():
    for bad in ["--api-keys=a,b", "--internal-token", "x --token abc", "SD_API_KEYS=k", "$(SD_INTERNAL_TOKEN)", "$HF_TOKEN", "hf_abcdefghijkl"]:
        assert SECRET_ON_ARGV.search(bad), bad
    for ok in ['"tokenizer/*"', "--internal-token-file /run/t", "--api-keys-file /k", "--include text_encoder/*.json"]:
        assert not SECRET_ON_ARGV.search(ok), ok


def env_from(deploy, name):
    return next((e for e in container(deploy).get("env", []) if e["name"] == name), None)


def test_model_services_take_grpc_only_from_the_gateway(overlay):
    _, docs = overlay
    policies = find(docs, "NetworkPolicy")
    labels = lambda stage: one(docs, "Deployment", stage)["spec"]["template"]["metadata"]["labels"]

    def selects(policy, stage):
        sel = policy["spec"]["podSelector"]
        have = labels(stage)
        ok = all(have.get(k) == v for k, v in sel.get("matchLabels", {}).items())
        for expr in sel.get("matchExpressions", []):
            assert expr["operator"] == "In", expr
            ok = ok and have.get(expr["key"]) in expr["values"]
        return ok

    def sources(policy, port):
        return [f for rule in policy["spec"]["ingress"] if any(p["port"] == port for p in rule["ports"]) for f in rule["from"]]

    gateway_labels = labels("gateway")
    for stage in MODEL_STAGES:
        mine = [p for p in policies if selects(p, stage)]
        assert len(mine) == 1, f"{stage}: {len(mine)} NetworkPolicies"
        policy = mine[0]
        assert "Ingress" in policy["spec"]["policyTypes"]
        c = container(one(docs, "Deployment", stage))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert set(ports) == {"grpc", "metrics"}
        # Every rule names its ports: nothing else is open.
        assert all(rule.get("ports") for rule in policy["spec"]["ingress"])
        grpc = sources(policy, "grpc") + sources(policy, ports["grpc"])
        assert grpc, f"{stage}: nobody may call it"
        for src in grpc:
            assert "namespaceSelector" not in src and "ipBlock" not in src, src
            want = src["podSelector"]["matchLabels"]
            assert want["app.kubernetes.io/component"] == "gateway"
            assert all(gateway_labels.get(k) == v for k, v in want.items()), "the selector matches the gateway's pods"
        metrics = sources(policy, "metrics") + sources(policy, ports["metrics"])
        assert metrics and all(s["podSelector"]["matchLabels"] for s in metrics), "metrics: only from Prometheus"
    assert not any(selects(p, "gateway") for p in policies), "the public gateway stays reachable"


def test_the_internal_token_comes_from_one_secret(overlay):
    _, docs = overlay
    for stage in STAGES:
        e = env_from(one(docs, "Deployment", stage), "SD_INTERNAL_TOKEN")
        assert e is not None and "value" not in e, f"{stage}: the token from a Secret"
        ref = e["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("sdserve-internal-token", "token")
        assert not ref.get("optional"), f"{stage}: must not start without it"
    keys = env_from(one(docs, "Deployment", "gateway"), "SD_API_KEYS")
    assert "secretKeyRef" in keys["valueFrom"]


def argv(c):
    return [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]


def test_no_secret_on_any_command_line_or_in_plain_env(overlay):
    _, docs = overlay
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for a in argv(c):
                assert not SECRET_ON_ARGV.search(a), f"{d['metadata']['name']}: {a!r} on a command line"
            for e in c.get("env", []):
                name = e["name"].lower()
                if any(w in name for w in ["token", "key", "password", "secret"]) and not name.endswith("_file"):
                    assert "value" not in e, f"{d['metadata']['name']}: {e['name']} in plain text"
    assert find(docs, "Secret") == [], "secrets are made by the operator, never checked in"


def test_compose_keeps_the_model_services_internal():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, networks = compose["services"], compose["networks"]
    internal = {n for n, cfg in networks.items() if (cfg or {}).get("internal")}
    assert internal, "an internal network"

    def env_files(svc):
        return [f["path"] if isinstance(f, dict) else f for f in svc.get("env_file", [])]

    for stage in MODEL_STAGES:
        svc = services[stage]
        assert "ports" not in svc, f"{stage}: published on the host"
        assert set(svc["networks"]) <= internal, f"{stage}: on a network with a way out"
        assert "internal-token.env" in env_files(svc), f"{stage}: the token"
    gw = services["gateway"]
    assert set(gw["networks"]) & internal and set(gw["networks"]) - internal
    assert "internal-token.env" in env_files(gw)
    text = (DOCKER / "compose.yaml").read_text()
    for name, svc in services.items():
        for a in [svc.get("command") or [], svc.get("entrypoint") or []]:
            a = " ".join(a) if isinstance(a, list) else a
            assert not SECRET_ON_ARGV.search(a), f"{name}: {a!r}"
        env = svc.get("environment") or {}
        assert not any(k in env for k in ["SD_INTERNAL_TOKEN", "SD_API_KEYS"]), f"{name}: a secret in the file"
    assert "SD_INTERNAL_TOKEN=" not in text.replace("echo \"SD_INTERNAL_TOKEN=", "")
    ignored = (ROOT / ".gitignore").read_text()
    assert "/deploy/docker/*.env" in ignored, "the env files stay out of git"


def test_the_images_carry_the_default_model():
    """Every model image carries models/emoji and serves it where SD_MODEL
    names no other; compose serves it unless SD_MODEL_DIR is given; the
    build context holds it but nothing built, downloaded or secret."""
    for stage in MODEL_STAGES:
        text = (DOCKER / f"{stage}.Dockerfile").read_text()
        runtime = text[text.rindex("\nFROM "):]
        copy = re.search(r"^COPY models/emoji (\S+)$", runtime, re.M)
        assert copy, f"{stage}: the default model is not copied into the runtime image"
        env_lines = " ".join(line for line in runtime.splitlines() if line.startswith("ENV "))
        assert f"SD_MODEL={copy.group(1)}" in env_lines, f"{stage}: SD_MODEL does not default to {copy.group(1)}"
        assert not copy.group(1).startswith("/models/"), "the weights volume is mounted at /models and would hide it"
    assert (ROOT / "models" / "emoji" / "model_index.json").is_file()
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for excluded in ["target", ".venv", ".git", "deploy/docker/*.env", "models/*"]:
        assert excluded in ignore, f".dockerignore: {excluded} goes into the build context"
    assert ignore.index("!models/emoji") > ignore.index("models/*"), "the default model must stay in the context"
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    volume = compose["x-model-service"]["volumes"][0]
    default = re.fullmatch(r"\$\{SD_MODEL_DIR:-([^}]+)\}:(\S+):ro", volume)
    assert default, volume
    assert (DOCKER / default.group(1) / "model_index.json").resolve().is_file(), "compose's default model"
    assert compose["x-model-service"]["environment"]["SD_MODEL"] == default.group(2)


def test_loras_reach_the_text_encoder_and_denoiser(overlay):
    """LoRA files live in loras/ on the weights volume (the Job makes the
    folder: a service refuses a --lora-dir that is not one); the text
    encoder and denoiser read it, the autoencoder does not."""
    _, docs = overlay
    job = one(docs, "Job", "sd-weights-download")
    assert "mkdir -p /models/loras" in " ".join(container(job)["args"])
    for stage in MODEL_STAGES:
        d = one(docs, "Deployment", stage)
        mounts = {m["name"]: m["mountPath"] for m in container(d)["volumeMounts"]}
        lora_dir = env(d).get("SD_LORA_DIR")
        if stage == "autoencoder":
            assert lora_dir is None
        else:
            assert lora_dir == "/models/loras"
            assert lora_dir.startswith(mounts["weights"] + "/")


def test_compose_mounts_a_lora_folder_for_the_text_encoder_and_denoiser():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert (DOCKER / "loras").is_dir(), "the default LoRA folder ships (with its README)"
    for stage in ["text-encoder", "denoiser"]:
        s = services[stage]
        assert s["environment"]["SD_LORA_DIR"] == "/loras"
        assert "${SD_LORA_HOST_DIR:-./loras}:/loras:ro" in s["volumes"]
        # the model mount stays (a service's own volumes replace the shared ones)
        assert any(v.endswith(":/models/sd:ro") for v in s["volumes"])
    assert "SD_LORA_DIR" not in services["autoencoder"]["environment"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "deploy/docker/loras" in ignored, "LoRA files stay out of the image build context"


# The async jobs API: Redis, webhooks, KEDA, a managed Redis.

JOB_STREAM, JOB_GROUP = "sd:jobs", "gateways"


def flag(args, name):
    """The value after `name` in an argument list."""
    args = [str(a) for a in args]
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


def pod_labels(docs, kind, name):
    return one(docs, kind, name)["spec"]["template"]["metadata"]["labels"]


def test_redis_keeps_the_jobs_on_a_volume_fsynced_on_every_write(overlay):
    _, docs = overlay
    sts = one(docs, "StatefulSet", "redis")
    spec = sts["spec"]
    assert spec["replicas"] == 1, "one primary: two would each take writes"
    c = container(sts)
    args = argv(c)
    assert flag(args, "--appendonly") == "yes" and flag(args, "--appendfsync") == "always"
    assert flag(args, "--maxmemory-policy") == "noeviction", "a full Redis must never drop jobs"
    image = c["image"]
    assert ":" in image and not image.endswith(":latest"), f"{image}: a pinned tag"
    # The data directory is the claim template's volume.
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    data = next(n for n, path in mounts.items() if path == flag(args, "--dir"))
    assert data in claims, "--dir is on the persistent volume"
    assert claims[data]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims[data]["spec"]["resources"]["requests"]["storage"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"], "the volume writable by the non-root user"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "redis-cli ping" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert "livenessProbe" in c
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    # The Service: port 6379 on the StatefulSet's pods, named by serviceName.
    svc = one(docs, "Service", "redis")
    assert spec["serviceName"] == "redis"
    labels = pod_labels(docs, "StatefulSet", "redis")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    port = next(p for p in svc["spec"]["ports"] if p["port"] == 6379)
    assert port["targetPort"] in ("redis", 6379) and {"name": "redis", "containerPort": 6379} in c["ports"]
    assert find(docs, "PodDisruptionBudget", "redis") == [], "one replica: a PDB would block every drain"


def test_the_gateway_takes_jobs_from_that_redis(overlay):
    _, docs = overlay
    gw = one(docs, "Deployment", "gateway")
    url = env(gw)["SD_REDIS_URL"]
    port = next(p["port"] for p in one(docs, "Service", "redis")["spec"]["ports"] if p["name"] == "redis")
    assert url == f"redis://redis:{port}/0"
    assert "@" not in url, "no credentials in plain text"
    # The webhook hosts from a ConfigMap that has them.
    ref = env_from(gw, "SD_WEBHOOK_ALLOW")["valueFrom"]["configMapKeyRef"]
    assert one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]


def test_the_webhook_secret_is_a_file_from_a_secret(overlay):
    _, docs = overlay
    gw = one(docs, "Deployment", "gateway")
    c, pod = container(gw), gw["spec"]["template"]["spec"]
    path = env(gw)["SD_WEBHOOK_SECRET_FILE"]
    # Only the file's path is in the environment: no variable carries it.
    assert not [e for e in c["env"] if "WEBHOOK_SECRET" in e["name"] and e["name"] != "SD_WEBHOOK_SECRET_FILE"]
    assert "webhook" not in str(c.get("envFrom", [])).lower()
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    assert mount["readOnly"] is True
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert vol["secretName"] == "sdserve-webhook-secret"
    assert not vol.get("optional"), "must not start without it"
    file = path[len(mount["mountPath"].rstrip("/")) + 1:]
    assert file in [i["path"] for i in vol["items"]], "the variable names the Secret's file"
    assert vol["defaultMode"] & 0o007 == 0, "not readable by every user"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "readable by the gateway's group"


def redis_policies(docs):
    labels = pod_labels(docs, "StatefulSet", "redis") if find(docs, "StatefulSet", "redis") else {
        "app.kubernetes.io/name": "sdserve", "app.kubernetes.io/component": "redis"}
    policies = []
    for p in find(docs, "NetworkPolicy"):
        sel = p["spec"]["podSelector"]
        match = all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items())
        for expr in sel.get("matchExpressions", []):
            match = match and expr["operator"] == "In" and labels.get(expr["key"]) in expr["values"]
        if match:
            policies.append(p)
    return policies


def redis_sources(docs):
    """The policy's sources, every rule checked to name port 6379 only."""
    policies = redis_policies(docs)
    assert len(policies) == 1, f"redis: {len(policies)} NetworkPolicies"
    policy = policies[0]
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] in (["redis"], [6379]), "nothing but 6379"
    return [src for rule in policy["spec"]["ingress"] for src in rule["from"]]


def test_only_the_gateway_reaches_redis(overlay):
    _, docs = overlay
    gateway_labels = pod_labels(docs, "Deployment", "gateway")
    sources = redis_sources(docs)
    assert sources
    for src in sources:
        assert set(src) == {"podSelector"}, f"{src}: only pods of this namespace"
        want = src["podSelector"]["matchLabels"]
        assert want["app.kubernetes.io/component"] == "gateway"
        assert all(gateway_labels.get(k) == v for k, v in want.items())


VARIANTS = {"gpu+keda": ("gpu", ["keda"]), "cpu+external-redis": ("cpu", ["external-redis"]),
            "gpu+keda+external-redis": ("gpu", ["keda", "external-redis"])}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    overlay, components = VARIANTS[request.param]
    return overlay, components, render_with(tmp_path_factory.mktemp(request.param), overlay, components)


def test_the_components_render_and_validate(variant):
    overlay, components, docs = variant
    skipped = validate_strictly(docs)
    assert skipped == (["ScaledObject"] if "keda" in components else [])
    # What the base promises still holds.
    for stage in STAGES:
        one(docs, "Deployment", stage)
    assert env(one(docs, "Deployment", "gateway"))["SD_WEBHOOK_SECRET_FILE"]
    assert find(docs, "Secret") == []
    assert all(d["metadata"].get("namespace") == "sdserve" for d in docs if d["kind"] != "Namespace")


def test_keda_scales_the_gateway_on_the_job_queue(tmp_path):
    base = render("gpu")
    docs = render_with(tmp_path, "gpu", ["keda"])
    so = one(docs, "ScaledObject", "gateway")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    hpa = one(base, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"redis-streams", "cpu"}
    streams = [t["metadata"] for t in spec["triggers"] if t["type"] == "redis-streams"]
    for q in streams:
        assert (q["stream"], q["consumerGroup"]) == (JOB_STREAM, JOB_GROUP)
    # Pending entries are the jobs running, at most a replica's job workers
    # (4 by default): a target at or above that would never scale up.
    queue = next(q for q in streams if "pendingEntriesCount" in q)
    assert 1 <= int(queue["pendingEntriesCount"]) < 4
    # The jobs waiting (the group's lag) scale it too.
    assert any(int(q.get("lagCount", 0)) >= 1 for q in streams)
    # KEDA's operator connects from its own namespace: the Service's full
    # name, its port, the gateway's database.
    svc = one(docs, "Service", "redis")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "redis")
    assert queue["address"] == f"redis.{so['metadata']['namespace']}.svc:{port}"
    assert env(one(docs, "Deployment", "gateway"))["SD_REDIS_URL"].endswith("/" + queue.get("databaseIndex", "0"))
    # The base HPA's CPU target, carried over.
    cpu_target = next(m["resource"]["target"]["averageUtilization"] for m in hpa["metrics"] if m["type"] == "Resource")
    assert triggers["cpu"]["metricType"] == "Utilization" and int(triggers["cpu"]["metadata"]["value"]) == cpu_target
    # One autoscaler per Deployment: KEDA's HPA is the gateway's only one
    # (and takes over the plain one where a cluster has it already).
    assert not [h for h in find(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "gateway"]
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] == "gateway"
    assert so["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    one(docs, "HorizontalPodAutoscaler", "denoiser")
    # Redis lets KEDA's operator in beside the gateway, and nobody else.
    sources = redis_sources(docs)
    keda = [s for s in sources if "namespaceSelector" in s]
    assert len(keda) == 1 and keda[0]["namespaceSelector"]["matchLabels"] and keda[0]["podSelector"]["matchLabels"]
    assert [s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in sources if s not in keda] == ["gateway"]


def test_an_external_redis_replaces_the_statefulset(tmp_path):
    docs = render_with(tmp_path, "cpu", ["external-redis"])
    assert find(docs, "StatefulSet") == [] and find(docs, "Service", "redis") == []
    assert redis_policies(docs) == []
    e = env_from(one(docs, "Deployment", "gateway"), "SD_REDIS_URL")
    assert "value" not in e, "its URL carries a password: from a Secret"
    ref = e["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("sdserve-redis", "url") and not ref.get("optional")


def test_compose_runs_redis_for_the_jobs_api():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, networks = compose["services"], compose["networks"]
    internal = {n for n, cfg in networks.items() if (cfg or {}).get("internal")}
    redis = services["redis"]
    image = redis["image"]
    assert image.startswith("redis:") and not image.endswith(":latest")
    cmd = redis["command"]
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    assert flag(cmd, "--appendonly") == "yes" and flag(cmd, "--appendfsync") == "always"
    volume = next(v for v in redis["volumes"] if v.endswith(":" + flag(cmd, "--dir")))
    assert volume.split(":")[0] in compose["volumes"], "the data in a named volume"
    assert "ports" not in redis and set(redis["networks"]) <= internal, "reachable from the backend only"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    gw = services["gateway"]
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert set(gw["depends_on"]) >= set(MODEL_STAGES)
    gw_env = gw["environment"]
    assert gw_env["SD_REDIS_URL"] == "redis://redis:6379/0"
    assert gw_env["SD_WEBHOOK_ALLOW"]
    # The webhook secret: a compose secret, a file the gateway alone gets,
    # named like the env files so git and the build context leave it out.
    (name,) = gw["secrets"]
    assert gw_env["SD_WEBHOOK_SECRET_FILE"] == f"/run/secrets/{name}"
    assert compose["secrets"][name]["file"].endswith(".env") and "/" not in compose["secrets"][name]["file"]
    assert not [s for s, svc in services.items() if s != "gateway" and svc.get("secrets")]
