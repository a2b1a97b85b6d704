"""The Dockerfile, the examples and the README agree with the code they describe."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import CONFIG_ENV, KEYS, Config, load_config

ROOT = Path(__file__).resolve().parent.parent
KNOWN_ENV = {spec.env for spec in KEYS.values()} | {CONFIG_ENV}


def test_every_environment_variable_mentioned_exists():
    for name in ("Dockerfile", "README.md", "config.example.yaml", *(ROOT / "examples").iterdir()):
        text = (ROOT / name).read_text()
        mentioned = set(re.findall(r"\bMDCLOUD_[A-Z_]+[A-Z]\b", text))
        assert mentioned <= KNOWN_ENV, (name, mentioned - KNOWN_ENV)


def test_compose_sidecar():
    compose = yaml.safe_load((ROOT / "examples/docker-compose.yml").read_text())
    proxy = compose["services"]["mdcloud-proxy"]
    (secret,) = proxy["secrets"]
    assert secret in compose["secrets"]
    assert proxy["environment"]["MDCLOUD_CLIENT_SECRET_FILE"] == f"/run/secrets/{secret}"
    assert int(proxy["stop_grace_period"].removesuffix("s")) > Config.shutdown_timeout
    tool = compose["services"]["tool"]
    assert tool["depends_on"]["mdcloud-proxy"]["condition"] == "service_healthy"
    assert "http://mdcloud-proxy:8080/-/ready" in tool["command"][0]


def test_kubernetes_sidecar():
    pod = yaml.safe_load((ROOT / "examples/kubernetes-pod.yaml").read_text())
    spec = pod["spec"]
    (proxy,) = spec["initContainers"]
    assert proxy["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["MDCLOUD_PROXY_LISTEN_HOST"] == "127.0.0.1"
    admin_port = int(env["MDCLOUD_PROXY_ADMIN_PORT"])
    assert proxy["ports"] == [{"name": "admin", "containerPort": admin_port}]
    https = {"port": "admin", "scheme": "HTTPS"}  # the admin listener has a certificate
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/-/ready", **https}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/-/healthy", **https}
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/-/metrics"
    assert spec["terminationGracePeriodSeconds"] > Config.shutdown_timeout
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    secrets = {v["secret"]["secretName"]: v for v in spec["volumes"] if "secret" in v}
    oauth = secrets["mdcloud-oauth"]
    (item,) = oauth["secret"]["items"]
    assert env["MDCLOUD_CLIENT_SECRET_FILE"] == f"{mounts[oauth['name']]}/{item['path']}"
    # The certificate from a kubernetes.io/tls Secret, mounted whole so that renewals reach it.
    tls = mounts[secrets["mdcloud-proxy-tls"]["name"]]
    assert env["MDCLOUD_PROXY_ADMIN_TLS_CERT_FILE"] == f"{tls}/tls.crt"
    assert env["MDCLOUD_PROXY_ADMIN_TLS_KEY_FILE"] == f"{tls}/tls.key"
    assert mounts["tmp"] == "/tmp"  # a read-only root still has room for replay spill files


def test_compose_fleet():
    """Three replicas and a Redis: the URL (with its password) from a secret file, Redis a
    bounded cache without persistence, and no replica waiting for Redis to be healthy."""
    compose = yaml.safe_load((ROOT / "examples/docker-compose-fleet.yml").read_text())
    proxy, redis = compose["services"]["mdcloud-proxy"], compose["services"]["redis"]
    assert proxy["deploy"]["replicas"] == 3
    env = proxy["environment"]
    assert "MDCLOUD_PROXY_CACHE_REDIS_URL" not in env
    assert env["MDCLOUD_PROXY_CACHE_REDIS_URL_FILE"] == "/run/secrets/redis_url"
    assert set(proxy["secrets"]) <= set(compose["secrets"])
    assert "redis_url" in proxy["secrets"] and "redis_password" in redis["secrets"]
    assert proxy["depends_on"]["redis"]["condition"] == "service_started"
    assert int(proxy["stop_grace_period"].removesuffix("s")) > Config.shutdown_timeout
    command = " ".join(redis["command"])
    for setting in ('--save ""', "--appendonly no", "--maxmemory-policy allkeys-lru"):
        assert setting in command
    assert "--requirepass" in command and "ports" not in redis
    # The URL the comment tells to write is one the proxy accepts.
    (line,) = [x for x in (ROOT / "examples/docker-compose-fleet.yml").read_text().splitlines()
               if "> redis_url.txt" in x]  # fmt: skip
    url = re.search(r"'(redis://[^']+)'", line).group(1).replace("%s", "pw")
    config = load_config(
        environ={"MDCLOUD_CLIENT_ID": "x", "MDCLOUD_CLIENT_SECRET": "y",
                 "MDCLOUD_PROXY_CACHE_REDIS_URL": url}
    )  # fmt: skip
    assert config.redis_url == "redis://:pw@redis:6379/0"


def test_kubernetes_fleet():
    documents = list(yaml.safe_load_all((ROOT / "examples/kubernetes-fleet.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    proxy = kinds["Deployment", "mdcloud-proxy"]
    assert proxy["spec"]["replicas"] == 3
    pod = proxy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (item,) = volumes["redis"]["secret"]["items"]
    assert volumes["redis"]["secret"]["secretName"] == "mdcloud-redis"
    assert env["MDCLOUD_PROXY_CACHE_REDIS_URL_FILE"] == f"{mounts['redis']}/{item['path']}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert pod["terminationGracePeriodSeconds"] > Config.shutdown_timeout
    assert mounts["tmp"] == "/tmp"
    # The URL the comment writes into the Secret names the Redis Service and its port.
    redis_service = kinds["Service", "mdcloud-redis"]
    (port,) = redis_service["spec"]["ports"]
    assert (
        f"@mdcloud-redis:{port['port']}/0" in (ROOT / "examples/kubernetes-fleet.yaml").read_text()
    )
    redis = kinds["Deployment", "mdcloud-redis"]["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(redis["args"])
    assert "--maxmemory-policy allkeys-lru" in args and "--appendonly no" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args
    # Redis takes connections from the proxies only; the proxies from labelled tools.
    guard = kinds["NetworkPolicy", "mdcloud-redis"]["spec"]
    assert guard["podSelector"]["matchLabels"] == redis_service["spec"]["selector"]
    assert guard["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app": "mdcloud-proxy"}
    service = kinds["Service", "mdcloud-proxy"]
    assert service["spec"]["selector"] == proxy["spec"]["selector"]["matchLabels"]


def test_image_defaults_are_a_valid_configuration():
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (env_line,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    env = dict(pair.split("=", 1) for pair in env_line.split()[1:])
    config = load_config(environ={**env, "MDCLOUD_CLIENT_ID": "x", "MDCLOUD_CLIENT_SECRET": "y"})
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.inbound_keys == () and not config.allow_unauthenticated

    def allowed(address: str) -> bool:
        return any(ipaddress.ip_address(address) in net for net in config.allowed_networks)

    for inside in ("127.0.0.1", "172.17.0.1", "10.244.1.7", "192.168.65.1", "::1", "fd00::5"):
        assert allowed(inside), inside
    for outside in ("8.8.8.8", "203.0.113.9", "2001:db8::1"):
        assert not allowed(outside), outside


async def test_the_grafana_dashboard_asks_only_for_metrics_the_proxy_exports(proxy, client):
    dashboard = json.loads((ROOT / "examples/grafana-dashboard.json").read_text())
    assert dashboard["schemaVersion"] >= 39
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")

    def queries(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    yield value
                else:
                    yield from queries(value)
        elif isinstance(node, list):
            for each in node:
                yield from queries(each)

    asked = {
        name
        for query in queries(dashboard)
        for name in re.findall(r"\b(?:mdcloud_proxy|process)_[a-z_]+", query)
    }
    async with client.get(proxy.url + "/-/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, ("",))
    }
    assert "mdcloud_proxy_throttle_waits_total" in asked and len(asked) > 15
    assert asked <= exported, sorted(asked - exported)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
