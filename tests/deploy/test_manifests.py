"""The deployment files, checked offline: the Kubernetes manifests against the Kubernetes JSON
schemas (kubernetes-validate ships them), the way they fit together, the per-tier start arguments
against BentoML's own command, and the BentoCloud configuration against BentoML's schema."""

from __future__ import annotations

from pathlib import Path

import attrs
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # an older supported release and the newest schema
BENTO_PATH = "/home/bentoml/bento"  # what the image's entry point appends to start-http-server


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return found


DOCUMENTS = documents()


def find(kind: str, name: str) -> dict:
    matches = [doc for _, doc in DOCUMENTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}"
    return matches[0]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container(deployment).get("env", [])}


def start_args(deployment: dict) -> dict:
    """The container's arguments parsed by BentoML's real `start-http-server` command."""
    from bentoml_cli._internal.start import start_command

    args = container(deployment)["args"]
    assert args[0] == "start-http-server", "the entry point's per-service start"
    command = start_command.commands["start-http-server"]
    context = command.make_context("start-http-server", [*args[1:], BENTO_PATH])
    return context.params


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name, document", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_manifest_is_valid_against_the_kubernetes_schema(name, document, version):
    kubernetes_validate.validate(document, version, strict=True)


def test_a_misspelt_field_is_caught_by_the_validator():
    """The validator really rejects what Kubernetes would (so the test above can fail)."""
    broken = yaml.safe_load(yaml.safe_dump(find("Deployment", "llm-service")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_both_tiers_run_the_same_image_and_share_the_settings():
    llm, prompt = find("Deployment", "llm-service"), find("Deployment", "prompt-service")
    assert container(llm)["image"] == container(prompt)["image"]
    config = find("ConfigMap", "llm-pipeline-config")["metadata"]["name"]
    for deployment in (llm, prompt):
        assert {"configMapRef": {"name": config}} in container(deployment)["envFrom"]


def test_llm_tier_starts_llmservice_alone_with_its_gpus():
    llm = find("Deployment", "llm-service")
    params = start_args(llm)
    assert params["service_name"] == "LLMService"
    assert params["depends"] == ()
    assert params["host"] == "0.0.0.0"
    resources = container(llm)["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    assert env_of(llm)["PIPELINE_TENSOR_PARALLEL_SIZE"] == gpus, "tensor parallel size = GPU count"
    assert int(gpus) >= 1


def test_prompt_tier_starts_promptservice_alone_pointing_at_the_llm_service():
    prompt = find("Deployment", "prompt-service")
    params = start_args(prompt)
    assert params["service_name"] == "PromptService"
    llm_service = find("Service", "llm-service")
    port = llm_service["spec"]["ports"][0]["port"]
    assert params["depends"] == (f"LLMService=http://{llm_service['metadata']['name']}:{port}",)
    resources = container(prompt)["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
    assert resources["requests"]["cpu"], "the HPA's utilisation target needs a CPU request"


@pytest.mark.parametrize("name", ["llm-service", "prompt-service"])
def test_probes_use_readyz_and_livez_on_the_served_port(name):
    deployment = find("Deployment", name)
    main = container(deployment)
    port_names = {port["name"]: port["containerPort"] for port in main["ports"]}
    served = start_args(deployment)["port"]
    assert port_names["http"] == served
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert main["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert main[probe]["httpGet"]["port"] in ("http", served)
        assert main[probe].get("timeoutSeconds", 1) >= 3


def test_the_llm_startup_probe_allows_a_slow_engine_start():
    probe = container(find("Deployment", "llm-service"))["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


@pytest.mark.parametrize("name, deployment_name", [("llm-service", "llm-service"), ("prompt-service", "prompt-service"),
                                                   ("llm-service-replicas", "llm-service")])
def test_each_service_selects_exactly_its_deployment(name, deployment_name):
    service = find("Service", name)
    selector = service["spec"]["selector"].items()
    selected = [doc["metadata"]["name"] for _, doc in DOCUMENTS
                if doc["kind"] == "Deployment" and selector <= doc["spec"]["template"]["metadata"]["labels"].items()]
    assert selected == [deployment_name]
    deployment = find("Deployment", deployment_name)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {port["name"] for port in container(deployment)["ports"]}


def test_llm_tier_is_reachable_only_inside_the_cluster_and_only_from_the_prompt_tier():
    service = find("Service", "llm-service")
    assert service["spec"]["type"] == "ClusterIP"
    policies = [doc for _, doc in DOCUMENTS if doc["kind"] == "NetworkPolicy"]
    llm_labels = find("Deployment", "llm-service")["spec"]["template"]["metadata"]["labels"]
    prompt_labels = find("Deployment", "prompt-service")["spec"]["template"]["metadata"]["labels"]
    guarding = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= llm_labels.items()]
    assert len(guarding) == 1
    spec = guarding[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (source,) = rule["from"]
    allowed = source["podSelector"]["matchLabels"]
    assert allowed.items() <= prompt_labels.items()
    assert not allowed.items() <= llm_labels.items()
    assert [port["port"] for port in rule["ports"]] == [start_args(find("Deployment", "llm-service"))["port"]]


def test_each_tier_has_its_own_hpa():
    """The CPU tier scales on CPU; the GPU tier on its engines' waiting queue (an External metric
    from the Prometheus adapter), one replica at a time, slower down than up."""
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc["spec"] for _, doc in DOCUMENTS
            if doc["kind"] == "HorizontalPodAutoscaler"}
    assert sorted(hpas) == ["llm-service", "prompt-service"]
    for spec in hpas.values():
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    assert hpas["prompt-service"]["metrics"][0]["resource"]["name"] == "cpu"
    (metric,) = hpas["llm-service"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "llm_pipeline_engine_requests_waiting"
    assert metric["external"]["target"]["type"] == "AverageValue"
    behavior = hpas["llm-service"]["behavior"]
    assert [policy["value"] for policy in behavior["scaleUp"]["policies"]] == [1]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]


def test_the_adapter_rule_serves_the_metric_the_gpu_hpa_reads():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "adapter-rules.yaml").read_text())
    (rule,) = rules["rules"]["external"]
    assert rule["name"]["as"] == "llm_pipeline_engine_requests_waiting"
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert "max by (namespace, pod)" in rule["metricsQuery"], "each pod counted once, whatever its engine clients"


def test_the_prompt_tier_finds_every_ready_gpu_replica_through_a_headless_service():
    """PIPELINE_GPU_TIER_REPLICAS names the headless Service (one DNS record per ready pod, no
    kube-proxy pinning a pooled connection to one pod), on the port the GPU tier serves."""
    headless = find("Service", "llm-service-replicas")["spec"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses", False)
    assert headless["selector"] == find("Service", "llm-service")["spec"]["selector"]
    discovery = env_of(find("Deployment", "prompt-service"))["PIPELINE_GPU_TIER_REPLICAS"]
    assert discovery == f"dns://llm-service-replicas:{headless['ports'][0]['port']}"
    assert headless["ports"][0]["port"] == start_args(find("Deployment", "llm-service"))["port"]


def test_a_gpu_pod_has_time_to_finish_its_streams_when_scaled_in():
    """terminationGracePeriodSeconds covers the longest stream: the pipeline's deadline."""
    config = find("ConfigMap", "llm-pipeline-config")["data"]
    grace = find("Deployment", "llm-service")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(config["PIPELINE_REQUEST_TIMEOUT_S"])


# --- BentoCloud ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cloud() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())


def test_bentocloud_config_uses_only_known_keys(cloud):
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentServiceConfig, DeploymentTargetHPAConf, HPAPolicy
    from bentoml._internal.cloud.schemas.schemasv2 import DeploymentConfigSchema

    top = {field.name for field in attrs.fields(DeploymentConfigSchema)} | {"name", "bento", "cluster"}
    assert set(cloud) <= top
    service_keys = {field.name for field in attrs.fields(DeploymentServiceConfig)}
    for name, service in cloud["services"].items():
        assert set(service) <= service_keys, name
        assert set(service["scaling"]) <= {field.name for field in attrs.fields(DeploymentTargetHPAConf)}
        assert set(service["scaling"].get("policy", {})) <= {field.name for field in attrs.fields(HPAPolicy)}


def test_bentocloud_config_structures_with_bentomls_schema(cloud):
    from bentoml._internal.cloud.schemas.schemasv2 import UpdateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    body = {key: value for key, value in cloud.items() if key not in {"name", "bento", "cluster"}}
    structured = bentoml_cattr.structure({**body, "bento": "llm-pipeline:test"}, UpdateDeploymentSchema)
    assert set(structured.services) == {"PromptService", "LLMService"}
    assert structured.services["LLMService"].scaling.min_replicas == 1


def test_bentocloud_config_overrides_are_valid_service_traffic_settings(cloud):
    from _bentoml_sdk.service.config import ServiceConfig, TrafficSchema
    from pydantic import TypeAdapter

    for name, service in cloud["services"].items():
        overrides = service["config_overrides"]
        assert set(overrides["traffic"]) <= set(TrafficSchema.__annotations__), name
        TypeAdapter(ServiceConfig).validate_python(overrides)


def test_each_tier_gets_its_own_hardware_and_replica_range(cloud):
    prompt, llm = cloud["services"]["PromptService"], cloud["services"]["LLMService"]
    assert prompt["instance_type"].startswith("cpu.")
    assert llm["instance_type"].startswith("gpu.")
    for service in (prompt, llm):
        assert 0 <= service["scaling"]["min_replicas"] <= service["scaling"]["max_replicas"]
        assert service["config_overrides"]["traffic"]["timeout"] > 0
        assert service["config_overrides"]["traffic"]["concurrency"] >= 1


def test_llm_tier_gpus_match_its_tensor_parallel_size(cloud):
    llm = cloud["services"]["LLMService"]
    gpus = llm["instance_type"].rsplit(".", 1)[1]
    envs = {env["name"]: env["value"] for env in llm["envs"]}
    assert envs["PIPELINE_TENSOR_PARALLEL_SIZE"] == gpus


def test_bentoml_timeouts_are_a_backstop_above_the_pipeline_deadline(cloud):
    deadline = float({env["name"]: env["value"] for env in cloud["envs"]}["PIPELINE_REQUEST_TIMEOUT_S"])
    for name, service in cloud["services"].items():
        assert service["config_overrides"]["traffic"]["timeout"] > deadline, name


def test_the_hugging_face_token_comes_from_a_secret_not_the_file(cloud):
    assert cloud["secrets"], "HF_TOKEN, which the Bento requires, is given as a secret"
    named = [env["name"] for env in cloud.get("envs", [])]
    named += [env["name"] for service in cloud["services"].values() for env in service.get("envs", [])]
    assert "HF_TOKEN" not in named


def test_both_tiers_take_the_internal_token_from_one_required_secret(cloud):
    """Tiers started apart must hold the same PIPELINE_INTERNAL_TOKEN, or LLMService refuses the
    front (401): one Secret key for both Deployments, not optional (a missing Secret stops the pod
    from starting instead of starting a tier that can never be called); on BentoCloud a secret
    shared by the whole deployment, never a value in the file."""
    sources = []
    for name in ("llm-service", "prompt-service"):
        env = {item["name"]: item for item in container(find("Deployment", name))["env"]}
        reference = env["PIPELINE_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert not reference.get("optional", False), name
        sources.append((reference["name"], reference["key"]))
    assert sources[0] == sources[1]
    assert "llm-pipeline-internal" in cloud["secrets"]
    named = [env["name"] for env in cloud.get("envs", [])]
    named += [env["name"] for service in cloud["services"].values() for env in service.get("envs", [])]
    assert "PIPELINE_INTERNAL_TOKEN" not in named
