"""deploy/: the Kubernetes manifests validate against the published schemas, offline (core kinds through
kubernetes-validate's bundled schemas, the Gateway API and InferencePool CRDs through the schemas vendored
in deploy/k8s/schemas), and the metrics the endpoint picker is told to read are ones hotlora exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

# `make test` installs it; the GPU image does not, and an import error there stopped `pytest -m gpu tests/` at
# collection (this module has no GPU test)
kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.33.0"
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-gateway.networking.k8s.io-v1.json",
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.name}#{i}", doc) for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields a structural CRD schema does not declare (the API server would prune them silently)."""
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        items = schema.get("items")
        if isinstance(value, list) and isinstance(items, dict):
            return [u for i, v in enumerate(value) for u in unknown_fields(v, items, f"{where}[{i}]")]
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    if props is None:
        return [u for k, v in value.items() for u in unknown_fields(v, extra, f"{where}.{k}")] if isinstance(
            extra, dict) else []
    out = [f"{where}.{k}" for k in value if k not in props]
    return out + [u for k, v in value.items() if k in props for u in unknown_fields(v, props[k], f"{where}.{k}")]


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_manifest_matches_its_published_schema(where, doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((DEPLOY / "k8s" / "schemas" / CRD_SCHEMAS[key]).read_text())
        jsonschema.Draft7Validator(schema).validate(doc)
        assert unknown_fields(doc, schema) == [], where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error or unknown field


def test_a_typo_is_caught():
    pool = next(d for _, d in documents() if d["kind"] == "InferencePool")
    bad = json.loads(json.dumps(pool))
    bad["spec"]["targetPort"] = bad["spec"].pop("targetPorts")
    schema = json.loads((DEPLOY / "k8s" / "schemas" / CRD_SCHEMAS[("inference.networking.k8s.io/v1",
                                                                      "InferencePool")]).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)
    deployment = json.loads(json.dumps(next(d for _, d in documents() if d["kind"] == "Deployment")))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_pool_selects_the_model_servers_and_routes_reference_what_exists():
    docs = [d for _, d in documents()]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    pool = by_kind["InferencePool", "hotlora"]
    servers = by_kind["Deployment", "hotlora"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= servers["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["containerPort"] for c in servers["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports
    assert ("Service", pool["spec"]["endpointPickerRef"]["name"]) in by_kind
    route = by_kind["HTTPRoute", "hotlora"]
    refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert all((b.get("kind", "Service"), b["name"]) in by_kind for b in refs)


def test_the_endpoint_picker_reads_metrics_hotlora_exports():
    from hotlora.server.api.metrics import Metrics
    from hotlora.server.engine.engine import EngineStats

    epp = next(d for _, d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "hotlora-epp")
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    wanted = {args[i + 1] for i, a in enumerate(args) if a.endswith("-metric")}
    assert len(wanted) == 5
    stats = EngineStats(num_running=1, num_waiting=2, kv_blocks_total=64, kv_blocks_used=8, running_adapters=["a"],
                        waiting_adapters=["b"], max_loras=4, num_preemptions=0, block_size=16)
    text = Metrics().render(stats, [], True).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert wanted <= exported, wanted - exported
    assert 'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",waiting_lora_adapters="b"}' in text
    assert 'vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="64"} 1.0' in text


def test_the_ray_serve_config_builds_the_application():
    pytest.importorskip("ray.serve")
    from hotlora.server.ray_serve import app_builder

    config = yaml.safe_load((DEPLOY / "ray" / "serve-config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "hotlora.server.ray_serve:app_builder"
    assert app_builder(app["args"]) is not None
