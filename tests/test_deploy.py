"""The deployment files: Prometheus config and rules, the Grafana dashboard, against the daemon."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.replay import replay

from .test_service import feed, spawn_daemon, wait_ready, wait_total

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install -y prometheus; .ci/run does it)")
    return path


def exported_series() -> set[str]:
    """Every sample name the daemon's metrics can expose."""
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def queried_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\bstreamcast_[a-z0-9_]+", e)}


def test_promtool_accepts_the_config_and_the_rules():
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def test_every_dashboard_panel_and_alert_queries_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "streamcast.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 10 and all(exprs)
    used = queried_metrics(exprs)
    exported = exported_series()
    assert not used - exported, f"the dashboard queries metrics the daemon lacks: {used - exported}"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alert_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    missing = queried_metrics(alert_exprs) - exported
    assert not missing, f"alerts query metrics the daemon lacks: {missing}"
    # what the issue asks the dashboard to show
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "batch", "lag", "dead letters", "skill", "version"):
        assert topic in titles, topic
    assert "retrain" in titles


@pytest.mark.slow
async def test_prometheus_scrapes_a_live_daemon(redis_server, redis_client, tmp_path):
    prometheus = tool("prometheus")
    keys = Keys("prom")
    http_port, prom_port = free_port(), free_port()
    daemon = spawn_daemon(redis_server.url, "prom", http_port, tmp_path)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{DEPLOY / 'prometheus' / 'alerts.yml'}]\n"
        "scrape_configs:\n"
        "  - job_name: streamcast\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{http_port}']}}]\n"
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_ready(http_port, daemon)
        names = ["P0", "P1"]
        await replay(redis_client, keys, feed(2, 200), names, rate=None)
        await wait_total(redis_client, keys, names, 2 * 151)

        def query(expr: str) -> list[dict]:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": expr}
            )
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
            assert body["status"] == "success", body
            return body["data"]["result"]

        deadline = time.monotonic() + 60
        while True:
            try:
                forecasts = query('streamcast_forecasts_total{kind="next"}')
                skill = query('streamcast_skill{horizon="1"}')
                if forecasts and float(forecasts[0]["value"][1]) == 2 * 151 and skill:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus never had the daemon's series"
            await asyncio.sleep(1)
        up = query('up{job="streamcast"}')
        assert up and up[0]["value"][1] == "1"
        latency = query(
            "histogram_quantile(0.99, sum by (le) (rate(streamcast_tick_to_forecast_seconds_bucket[1m])))"
        )
        assert latency and float(latency[0]["value"][1]) > 0
        rules = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5).read()
        )
        assert len(rules["data"]["groups"][0]["rules"]) == 8
    finally:
        server.terminate()
        server.wait(15)
        daemon.terminate()
        daemon.wait(30)


# -- the image, Compose and Kubernetes -----------------------------------------------------------

ROOT = DEPLOY.parent


def test_dockerfile_caches_dependencies_runs_as_non_root_and_checks_health():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    deps = next(i for i, line in enumerate(lines) if line.startswith("COPY pyproject.toml"))
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY streamcast"))
    assert deps < source, "dependencies must be installed before the source is copied"
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1] not in ("root", "0")
    assert 'CMD ["streamcast", "check", "--ready"]' in text and "HEALTHCHECK" in text
    assert "ARG VARIANT=cpu" in text and '".[gpu]"' in text


def test_compose_file_validates_and_wires_the_stack():
    compose = tool("docker-compose")
    out = subprocess.run(
        [compose, "-f", str(DEPLOY / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SP500_CSV": "/data/sp500.csv", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert set(services) == {"redis", "streamcast", "replay", "prometheus", "grafana"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["replay"]["command"][:2] == ["replay", "/data/sp500.csv"]
    assert any(v.endswith(":/data/sp500.csv:ro") for v in _volumes(services["replay"]))
    assert services["streamcast"]["environment"]["STREAMCAST_REDIS_URL"] == "redis://redis:6379/0"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["streamcast:8000"]


def _volumes(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            out.append(v)
        else:
            out.append(f"{v['source']}:{v['target']}" + (":ro" if v.get("read_only") else ""))
    return out


def test_kubernetes_statefulset_shards_by_ordinal_with_probes_and_grace():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "streamcast.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Service", "StatefulSet"}
    sts = kinds["StatefulSet"]
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["STREAMCAST_SHARD_COUNT"]) == sts["spec"]["replicas"]
    assert 'STREAMCAST_SHARD_INDEX="${HOSTNAME##*-}"' in " ".join(container["command"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(
        env["STREAMCAST_SHUTDOWN_TIMEOUT_S"]
    )
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the settings the manifest sets are settings the daemon knows
    from streamcast.settings import Settings

    known = {f"STREAMCAST_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env if name.startswith("STREAMCAST_")} <= known | {
        "STREAMCAST_SHARD_INDEX"
    }


async def test_streamcast_check_answers_for_probes(tmp_path):
    import sys

    from streamcast.http import HttpServer

    ready = {"value": False}
    server = HttpServer(
        CollectorRegistry(),
        host="127.0.0.1",
        port=0,
        ready=lambda: ready["value"],
        heartbeat=time.monotonic,
        redis_ping=lambda: True,
    )

    async def check(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamcast.cli",
            "check",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    async with server:
        url = f"http://127.0.0.1:{server.port}"
        assert (await check("--url", url))[0] == 0
        code, out = await check("--url", url, "--ready")
        assert code == 1 and "503" in out
        ready["value"] = True
        assert (await check("--url", url, "--ready"))[0] == 0
    code, out = await check("--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and out.startswith("not ok:") and "Traceback" not in out
