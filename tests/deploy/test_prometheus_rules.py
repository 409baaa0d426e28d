"""The Prometheus files in deploy/prometheus/, checked with Prometheus' own promtool: the rules
parse (`promtool check rules`), their alert unit tests pass (`promtool test rules`), and the scrape
configuration is valid. promtool comes from Debian's `prometheus` package, which
`scripts/setup.sh --dev` installs; without it these tests fail rather than skip.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "pipeline-rules.yml"


def pipeline_metric_names() -> set[str]:
    """The pipeline_* metrics both tiers define (services/front/metrics.py, services/gpu/metrics.py)."""
    return {name for tier in ("front", "gpu")
            for name in re.findall(r'"(pipeline_\w+)"', (ROOT / "services" / tier / "metrics.py").read_text())}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: ./scripts/setup.sh --dev installs Debian's prometheus package"
    return found


def run(*command: str, cwd: Path = PROMETHEUS) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_rules_are_valid(promtool):
    assert "SUCCESS" in run(promtool, "check", "rules", RULES.name)


def test_the_alert_unit_tests_pass(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "pipeline-rules.test.yml")


def test_every_alert_is_unit_tested():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "pipeline-rules.test.yml").read_text()))
    assert alerts == tested


def test_the_pipeline_series_the_rules_read_exist():
    """Every pipeline_* name in the rules is one the tiers' metrics modules define."""
    defined = pipeline_metric_names()
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name)
            for name in re.findall(r"\b(pipeline_\w+)", RULES.read_text()) if not name.endswith("_")}
    assert used <= defined, used - defined


def test_the_scrape_configuration_is_valid(promtool, tmp_path):
    """prometheus.yml keeps only annotated pipeline pods and labels them by tier; with its Kubernetes
    discovery replaced by static targets, as scripts/prometheus_check.py runs it (Debian's build
    leaves out Kubernetes discovery), it passes promtool with its rules."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    relabels = {tuple(r.get("source_labels", ())): r for r in job["relabel_configs"]}
    assert relabels[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabels[("__meta_kubernetes_pod_label_app_kubernetes_io_component",)]["target_label"] == "tier"
    spec = importlib.util.spec_from_file_location("prometheus_check", ROOT / "scripts" / "prometheus_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    local = script.local_config({"prompt-service": "127.0.0.1:3000", "llm-service": "127.0.0.1:3001"})
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(local))
    assert "SUCCESS" in run(promtool, "check", "config", str(path), cwd=tmp_path)


def test_both_tiers_are_annotated_for_scraping():
    for manifest in ("prompt-service.yaml", "llm-service.yaml"):
        deployment = next(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / manifest).read_text()))
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"


def test_the_grafana_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """deploy/grafana/llm-pipeline.json: one row per tier, the engine and the routing over GPU replicas, and every panel's query
    parses (promtool checks them as recording rules) and reads only series the pipeline exports."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "llm-pipeline.json").read_text())
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Front tier (PromptService)", "GPU tier (LLMService)", "Engine (vLLM)", "GPU replicas (routing)"]
    exprs = [target["expr"].replace("$__rate_interval", "1m")
             for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]]
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": expr}
                                                         for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in run(promtool, "check", "rules", str(path), cwd=tmp_path)
    defined = pipeline_metric_names()
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in re.findall(r"\b(pipeline_\w+)", " ".join(exprs))}
    assert used <= defined, used - defined
