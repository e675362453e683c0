"""The deployment files: Prometheus config and rules, the Grafana dashboard, against the daemon."""

from __future__ import annotations

import asyncio
import itertools
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

from .helpers import feed, known_settings, spawn_daemon, wait_ready, wait_total

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PARTITIONS = 12  # STREAMCAST_PARTITIONS of the example deployments under deploy/
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
    for family in Metrics(CollectorRegistry()).prometheus.collect():
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
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]  # a row only heads others
    exprs = [t["expr"] for panel in graphs for t in panel["targets"]]
    assert len(graphs) >= 10 and all(exprs)
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


def test_dashboard_has_a_partitions_row_with_lag_ownership_members_and_moves():
    panels = json.loads((DEPLOY / "grafana" / "dashboards" / "streamcast.json").read_text())[
        "panels"
    ]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Partitions"]
    assert len(rows) == 1
    below = panels[rows[0] + 1 :]
    below = below[: next((i for i, p in enumerate(below) if p["type"] == "row"), len(below))]
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    assert "by (partition) (streamcast_partition_lag)" in exprs
    assert "by (instance) (streamcast_partitions_owned)" in exprs
    assert "streamcast_members" in exprs and "streamcast_partitions_share" in exprs
    assert "rate(streamcast_partition_moves_total" in exprs and "by (how)" in exprs
    # the row sits below every other panel, and its panels below it
    row_y = panels[rows[0]]["gridPos"]["y"]
    assert all(p["gridPos"]["y"] < row_y for p in panels[: rows[0]])
    assert all(p["gridPos"]["y"] > row_y for p in below)


def test_dashboard_has_an_intervals_row_with_coverage_against_nominal_width_and_score():
    panels = json.loads((DEPLOY / "grafana" / "dashboards" / "streamcast.json").read_text())[
        "panels"
    ]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Intervals"]
    assert len(rows) == 1
    row_y = panels[rows[0]]["gridPos"]["y"]
    below = panels[rows[0] + 1 :]
    below = below[: next((i for i, p in enumerate(below) if p["type"] == "row"), len(below))]
    assert len(below) == 4 and all(p["gridPos"]["y"] > row_y for p in below)
    assert all(p["gridPos"]["y"] < row_y for p in panels[: rows[0]])  # the last row
    by_title = {p["title"].split(" (")[0]: p for p in below}
    # coverage from the counters over 15 m, by horizon and level, the nominal levels as lines
    coverage = by_title["Interval coverage by horizon and level"]
    (expr,) = [t["expr"] for t in coverage["targets"]]
    assert expr == (
        "1 - sum by (horizon, level) (rate(streamcast_interval_misses_total[15m]))"
        " / sum by (horizon, level) (rate(streamcast_interval_resolved_total[15m]))"
    )
    defaults = coverage["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert [s["value"] for s in defaults["thresholds"]["steps"]] == [None, 0.8, 0.95]
    assert defaults["custom"]["thresholdsStyle"]["mode"] in ("line", "dashed")
    for title, metric in (
        ("Interval mean width", "streamcast_interval_width"),
        ("Interval score", "streamcast_interval_score"),
        ("Interval coverage by version", "streamcast_interval_coverage"),
    ):
        (expr,) = [t["expr"] for t in by_title[title]["targets"]]
        assert expr == f"avg by (horizon, level, version) ({metric})", title


# the coverage alert fed known counters for an hour: (horizon, level, resolved a minute and
# missed a minute by each version listed, the points off nominal when it fires, else None)
COVERAGE_CASES = [
    ("1", "80", 60, 18, ("v1", "v2"), 10),  # 70 %: 10 points under, over both versions
    ("50", "80", 60, 3, ("v1",), 15),  # 95 %: 15 points over
    ("50", "95", 60, 3, ("v1",), None),  # on the mark
    ("1", "95", 60, 6, ("v1",), None),  # 90 %: 5 points under, not more
    ("50", "95", 3, 3, ("v1",), None),  # all missed, but 0.05 resolved a second: too few
    ("10", "80", 60, 30, ("v1",), None),  # 50 %, but 10 steps are not watched
]


def test_interval_coverage_alert_fires_off_nominal_with_enough_resolved(tmp_path):
    promtool = tool("promtool")
    series = []
    for horizon, level, resolved, missed, versions, _ in COVERAGE_CASES:
        for version in versions:
            labels = f'horizon="{horizon}",level="{level}",version="{version}",job="streamcast"'
            for name, per_minute in (("resolved", resolved), ("misses", missed)):
                metric = f"streamcast_interval_{name}_total{{{labels}}}"
                series.append({"series": metric, "values": f"0+{per_minute}x60"})
    firing = [
        {
            "exp_labels": {"severity": "warn", "horizon": h, "level": lv},
            "exp_annotations": {
                "summary": f"the coverage of the {lv} % bands at {h} step(s) has been {off}% off "
                "nominal for 15 minutes (over 30 m): the feed changes faster than the "
                "calibration follows (see streamcast_interval_coverage by version)"
            },
        }
        for h, lv, *_, off in COVERAGE_CASES
        if off is not None
    ]
    assert len(firing) == 2
    tests = {
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    # a rate from the second sample on (1 m), then 15 m pending: not yet at 10 m
                    {
                        "eval_time": "10m",
                        "alertname": "StreamcastIntervalCoverageOff",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "50m",
                        "alertname": "StreamcastIntervalCoverageOff",
                        "exp_alerts": firing,
                    },
                ],
            }
        ],
    }
    spec = tmp_path / "coverage-test.yml"
    spec.write_text(yaml.safe_dump(tests))
    out = subprocess.run(
        [promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr  # a mismatch prints what fired
    assert "SUCCESS" in out.stdout + out.stderr


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
        ours = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]
        assert len(rules["data"]["groups"][0]["rules"]) == len(ours["rules"])
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
    assert image_user(text) == (10001, 10001)
    assert 'CMD ["streamcast", "check", "--ready"]' in text and "HEALTHCHECK" in text
    assert "ARG VARIANT=cpu" in text and 'requirements.py "$VARIANT"' in text
    # a virtual environment: the same steps on the official image and on Debian's python3
    assert 'python3 -m venv "$VIRTUAL_ENV"' in text and "PATH=/opt/streamcast/bin:$PATH" in text


def _number(text: str | None) -> int:
    return int(text) if text is not None and text.isdigit() else -1  # -1: not known, refused


def image_user(dockerfile: str) -> tuple[int, int]:
    """The (uid, gid) the image's last stage runs as, from its USER line and the useradd or
    groupadd lines that create a named user or group; AssertionError if root or not known."""
    stage = re.split(r"(?im)^FROM\s", dockerfile)[-1]
    lines = [line.strip() for line in stage.replace("\\\n", " ").splitlines()]
    users = [line.split(None, 1)[1].strip() for line in lines if line.upper().startswith("USER ")]
    assert users, "no USER line in the last stage: the image runs as root"
    user, _, group = users[-1].partition(":")
    created: dict[str, tuple[int, int]] = {}  # user name -> (uid, primary gid)
    groups = {"root": 0}
    commands = r"\b(useradd|adduser|groupadd|addgroup)\b([^&;|\n]*)"
    for kind, rest in re.findall(commands, "\n".join(lines)):
        args = rest.split()
        options = dict(itertools.pairwise(args))
        name = args[-1] if args else ""
        shared = "-o" in args or "--non-unique" in args  # may share root's id
        if kind in ("groupadd", "addgroup"):
            groups[name] = -1 if shared else _number(options.get("--gid", options.get("-g")))
            continue
        uid = -1 if shared else _number(options.get("--uid", options.get("-u")))
        primary = options.get("--gid", options.get("-g"))
        if primary is None:
            gid = uid  # its own group, of the same name and number
        else:
            gid = int(primary) if primary.isdigit() else groups.get(primary, -1)
        created[name] = (uid, gid)
    if user.isdigit():
        # a uid with no user of its own runs with the root group unless USER names one
        uid, primary_gid = int(user), {u: g for u, g in created.values()}.get(int(user), 0)
    else:
        assert user in created, f"USER {user}: not created in the Dockerfile"
        uid, primary_gid = created[user]
    if group:
        assert group.isdigit() or group in groups, f"USER {users[-1]}: group not created"
        gid = int(group) if group.isdigit() else groups[group]
    else:
        gid = primary_gid
    assert uid >= 1000, f"USER {users[-1]}: uid {uid} (root, a system account, or not given)"
    assert gid >= 1000, f"USER {users[-1]}: gid {gid} (root, a system group, or not given)"
    return uid, gid


GOOD_USER = "RUN useradd --create-home --uid 10001 app\nUSER app\n"


@pytest.mark.parametrize(
    ("dockerfile", "why"),
    [
        ("FROM x\nRUN true\n", "no USER"),
        ("FROM x\nUSER root\n", "root by name"),
        ("FROM x\nUSER 0\n", "root by number"),
        ("FROM x\nUSER 0:0\n", "root user and group"),
        ("FROM x\nUSER 10001\n", "a bare uid: the root group"),
        ("FROM x\nUSER 10001:0\n", "root group"),
        ("FROM x\n" + GOOD_USER.replace("USER app", "USER app:root"), "root group by name"),
        ("FROM x\nRUN useradd --uid 0 -o app\nUSER app\n", "uid 0, shared"),
        ("FROM x\nRUN useradd --system app\nUSER app\n", "a system uid, not given"),
        ("FROM x\nRUN useradd --uid 999 app\nUSER app\n", "a system uid"),
        ("FROM x\nRUN useradd --uid 10001 -g 0 app\nUSER app\n", "root primary group"),
        ("FROM x\nUSER nobody\n", "a user the Dockerfile does not create"),
        ("FROM x AS build\n" + GOOD_USER + "FROM y\nRUN true\n", "USER only in another stage"),
    ],
)
def test_dockerfile_user_check_refuses_root_in_every_spelling(dockerfile, why):
    with pytest.raises(AssertionError):
        image_user(dockerfile)


def test_dockerfile_user_check_accepts_non_root_spellings():
    assert image_user("FROM x\n" + GOOD_USER) == (10001, 10001)
    assert image_user("FROM x\nUSER 10001:10001\n") == (10001, 10001)
    groups = "RUN groupadd --gid 2000 g && useradd --uid 2001 -g g app\nUSER app:g\n"
    assert image_user("FROM x\n" + groups) == (2001, 2000)


def k8s_docs() -> list[dict]:
    """Every object of every manifest under deploy/k8s/."""
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def test_dockerfile_and_kubernetes_run_as_non_root_without_capabilities_on_a_read_only_root():
    uid, gid = image_user((ROOT / "Dockerfile").read_text())
    workloads = [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["kind"] for d in workloads} == {"Deployment", "StatefulSet"}
    for workload in workloads:
        _check_pod_is_non_root(workload["spec"]["template"]["spec"], uid, gid)


def _check_pod_is_non_root(pod: dict, uid: int, gid: int) -> None:
    for container in pod["containers"]:
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, container["name"]
        assert context.get("runAsUser", uid) == uid and context.get("runAsGroup", gid) == gid
        assert context.get("privileged", False) is False
        assert context.get("allowPrivilegeEscalation", False) is False
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        capabilities = context.get("capabilities", {})
        assert "ALL" in capabilities.get("drop", []) and not capabilities.get("add")
        # what the daemon writes (the model cache, temporary files) is on a mounted volume
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for path in (env.get("STREAMCAST_MODEL_CACHE_DIR") or "", "/tmp"):
            assert any(path.startswith(m) for m in mounts), f"{path} is on the read-only root"


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
    # the replay serves no /readyz for the image's HEALTHCHECK (tests/test_compose.py runs the
    # stack; the replay stops on the SIGTERM of `stop`: tests/test_replay.py)
    assert services["replay"]["healthcheck"] == {"test": ["NONE"]}
    assert services["streamcast"]["environment"]["STREAMCAST_REDIS_URL"] == "redis://redis:6379/0"
    # `up --scale streamcast=3`: no fixed name, no fixed host port, one partition count for all
    streamcast = services["streamcast"]
    assert "container_name" not in streamcast
    for port in streamcast.get("ports", []):
        published = port.get("published") if isinstance(port, dict) else port.split(":")[-2:-1]
        assert not published, f"a fixed host port collides when scaled: {port}"
    assert streamcast["environment"]["STREAMCAST_ASSIGNMENT"] == "lease"
    for name in ("streamcast", "replay"):
        assert services[name]["environment"]["STREAMCAST_PARTITIONS"] == str(PARTITIONS), name
    # Prometheus finds every replica by the service's name in Compose's DNS
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["dns_sd_configs"] == [
        {"names": ["streamcast"], "type": "A", "port": 8000, "refresh_interval": "5s"}
    ]
    assert "static_configs" not in job


def _volumes(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            out.append(v)
        else:
            out.append(f"{v['source']}:{v['target']}" + (":ro" if v.get("read_only") else ""))
    return out


def _manifest(name: str) -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))
    return {d["kind"]: d for d in docs}


def test_every_yaml_file_under_deploy_loads():
    paths = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(paths) >= 7
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_kubernetes_deployment_shares_the_partitions_by_lease():
    kinds = _manifest("streamcast.yaml")
    assert set(kinds) == {"Service", "Deployment"}
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STREAMCAST_PARTITIONS"] == str(PARTITIONS)
    assert env["STREAMCAST_ASSIGNMENT"] == "lease"
    assert "STREAMCAST_SHARD_INDEX" not in env and "STREAMCAST_SHARD_COUNT" not in env
    assert 1 <= deployment["spec"]["replicas"] <= PARTITIONS
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(
        env["STREAMCAST_SHUTDOWN_TIMEOUT_S"]
    )
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert {name for name in env if name.startswith("STREAMCAST_")} <= known_settings()


def test_keda_reads_one_stream_per_partition_and_scales_at_most_to_the_partitions():
    from streamcast.keys import Keys

    kinds = _manifest("keda-scaledobject.yaml")
    spec = kinds["ScaledObject"]["spec"]
    assert (
        spec["scaleTargetRef"]["name"]
        == _manifest("streamcast.yaml")["Deployment"]["metadata"]["name"]
    )
    keys = Keys("streamcast", PARTITIONS)
    triggers = spec["triggers"]
    assert all(t["type"] == "redis-streams" for t in triggers)
    streams = [t["metadata"]["stream"] for t in triggers]
    assert streams == [f"streamcast:{{p{n}}}:ticks" for n in range(PARTITIONS)]
    assert streams == keys.all_ticks()  # the daemon's own key names
    for t in triggers:
        assert t["metadata"]["consumerGroup"] == keys.group == "streamcast:forecasters"
        assert int(t["metadata"]["lagCount"]) > 0
    # one metric: the lags added up (the HPA alone would follow the largest)
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert sorted(formula.replace(" ", "").split("+")) == sorted(t["name"] for t in triggers)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= PARTITIONS


def test_hpa_scales_on_the_stream_lag_at_most_to_the_partitions():
    hpa = _manifest("hpa.yaml")["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "streamcast",
    }
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= PARTITIONS
    (metric,) = spec["metrics"]
    assert metric["type"] in ("External", "Pods")
    assert metric[metric["type"].lower()]["metric"]["name"] == "streamcast_stream_lag"
    assert "streamcast_stream_lag" in exported_series()
    assert "prometheus-adapter" in (DEPLOY / "k8s" / "hpa.yaml").read_text()


def test_partition_alerts_cover_unowned_partitions_and_growing_lag():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    unowned = by_name["StreamcastPartitionUnowned"]
    assert "by (partition) (streamcast_partition_owned)" in unowned["expr"]
    assert unowned["for"] == "1m"
    total = by_name["StreamcastPartitionsUnowned"]
    assert "sum(streamcast_partitions_owned)" in total["expr"]
    assert total["expr"].rstrip().endswith(f"< {PARTITIONS}"), "the deployments' partition count"
    lag = by_name["StreamcastPartitionLagGrowing"]
    assert "by (partition)" in lag["expr"] and "deriv(streamcast_partition_lag[5m])" in lag["expr"]
    assert lag["for"] == "5m"


def test_kubernetes_statefulset_owns_partitions_by_ordinal_with_probes_and_grace():
    kinds = _manifest("streamcast-static.yaml")
    assert set(kinds) == {"Service", "StatefulSet"}
    sts = kinds["StatefulSet"]
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STREAMCAST_ASSIGNMENT"] == "static"
    assert int(env["STREAMCAST_SHARD_COUNT"]) == sts["spec"]["replicas"]
    assert int(env["STREAMCAST_SHARD_COUNT"]) <= int(env["STREAMCAST_PARTITIONS"]) == PARTITIONS
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
    assert {name for name in env if name.startswith("STREAMCAST_")} <= known_settings()


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
