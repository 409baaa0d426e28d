"""The Prometheus files in deploy/prometheus/, checked with Prometheus' own promtool: the rules
parse (`promtool check rules`), their alert unit tests pass (`promtool test rules`), and the scrape
configuration is valid. promtool comes from Debian's `prometheus` package, which
`scripts/setup.sh --dev` installs; without it these tests fail rather than skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "pipeline-rules.yml"


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
    """Every pipeline_* name in the rules is one services/metrics.py defines."""
    defined = set(re.findall(r'"(pipeline_\w+)"', (ROOT / "services" / "metrics.py").read_text()))
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name)
            for name in re.findall(r"\b(pipeline_\w+)", RULES.read_text()) if not name.endswith("_")}
    assert used <= defined, used - defined


def test_the_scrape_configuration_is_valid(promtool, tmp_path):
    """prometheus.yml, with its Kubernetes discovery replaced by static targets (Debian's build
    leaves out Kubernetes discovery), keeps the job, rules and labels and passes promtool."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    relabels = {tuple(r.get("source_labels", ())): r for r in job["relabel_configs"]}
    assert relabels[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabels[("__meta_kubernetes_pod_label_app_kubernetes_io_component",)]["target_label"] == "tier"
    job.pop("kubernetes_sd_configs")
    job.pop("relabel_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:3000"], "labels": {"tier": "prompt-service"}}]
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    assert "SUCCESS" in run(promtool, "check", "config", str(path), cwd=tmp_path)


def test_both_tiers_are_annotated_for_scraping():
    for manifest in ("prompt-service.yaml", "llm-service.yaml"):
        deployment = next(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / manifest).read_text()))
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
