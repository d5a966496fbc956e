"""The Grafana dashboard, its provisioning and the Prometheus alert rules.

Structure: the dashboard JSON is validated against a JSON Schema written here for the parts of
Grafana's dashboard model that Grafana needs to load and render it (no published Grafana schema
is installed in the venv); the provisioning files and the rule file are checked the same way.

Queries: the relay and the control API are started for real (``relay_stack``), a real call runs
through them (audio both ways, so every histogram has samples), a refused connect and a failed
upstream fill the error counters, and both ``/metrics`` endpoints are scraped and parsed with
prometheus_client's parser. Every metric every dashboard query and alert rule reads must be in
the scrape, with every label its selectors and aggregations use.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from control_api.metrics import PoolStats
from relay.metrics import PubSubListenerUp, TenantCalls
from tests.support.promql import metric_names, read
from tests.support.relay_stack import (
    ConnectRefused,
    call_client,
    pcm_silence,
    pcm_tone,
    relay_stack,
    stream,
)
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config/grafana/dashboards/voicerelay.json"
DATASOURCES = ROOT / "config/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "config/grafana/provisioning/dashboards/voicerelay.yml"
ALERTS = ROOT / "config/prometheus/alerts.yml"

# Series Prometheus makes itself, and the labels it adds to every scraped series.
SYNTHETIC_METRICS = frozenset({"up"})
TARGET_LABELS = frozenset({"job", "instance"})
# Labelled counters that only get a series when something rare happens; the test cannot cause
# them without breaking Redis, so their label names are checked against the metric definition.
RARE = {
    "voicerelay_relay_call_log_dropped_total": "events lost before reaching Redis",
    "voicerelay_call_log_consumer_errors_total": "the consumer failing against Postgres/Redis",
}
FRAME_20MS = 640

_GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
_DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string", "minLength": 1}},
}
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating", "annotations"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "refresh": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array"}},
        },
        "annotations": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array"}},
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["id", "type", "title", "gridPos", "panels", "collapsed"],
                        "properties": {
                            "id": {"type": "integer", "minimum": 1},
                            "type": {"const": "row"},
                            "title": {"type": "string", "minLength": 1},
                            "gridPos": _GRID,
                            "collapsed": {"type": "boolean"},
                            "panels": {"type": "array", "maxItems": 0},
                        },
                    },
                    {
                        "type": "object",
                        "required": ["id", "type", "title", "gridPos", "datasource", "targets"],
                        "properties": {
                            "id": {"type": "integer", "minimum": 1},
                            "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table"]},
                            "title": {"type": "string", "minLength": 1},
                            "gridPos": _GRID,
                            "datasource": _DATASOURCE,
                            "fieldConfig": {
                                "type": "object",
                                "required": ["defaults", "overrides"],
                            },
                            "targets": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["refId", "expr", "datasource"],
                                    "properties": {
                                        "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "datasource": _DATASOURCE,
                                        "legendFormat": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                ]
            },
        },
    },
}
ALERTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string"},
                    "rules": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["alert", "expr", "for", "labels", "annotations"],
                            "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]+$"},
                                "expr": {"type": "string", "minLength": 1},
                                "for": {"type": "string", "pattern": "^[0-9]+[smhd]$"},
                                "labels": {
                                    "type": "object",
                                    "required": ["severity"],
                                    "properties": {
                                        "severity": {"enum": ["critical", "warning", "info"]}
                                    },
                                },
                                "annotations": {
                                    "type": "object",
                                    "required": ["summary", "description"],
                                    "properties": {
                                        "summary": {"type": "string", "minLength": 1},
                                        "description": {"type": "string", "minLength": 1},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _alerts() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return loaded


def _queries() -> Iterator[tuple[str, str]]:
    """(where, expression) for every dashboard target and every alert rule."""
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for group in _alerts()["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


# --- structure ----------------------------------------------------------------------------------


def test_dashboard_matches_the_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(DASHBOARD_SCHEMA)
    jsonschema.validate(_dashboard(), DASHBOARD_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for panel in panels:
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_query_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())
    assert provisioned["apiVersion"] == 1
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].startswith("http")
    uid = datasource["uid"]
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_provider_loads_the_dashboards_folder() -> None:
    provisioned = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert provisioned["apiVersion"] == 1
    (provider,) = provisioned["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_dashboard_covers_what_operators_watch() -> None:
    read_metrics = {
        name
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
        for name in metric_names(target["expr"])
    }
    for needed in (
        "voicerelay_relay_active_calls",
        "voicerelay_relay_tenant_active_calls",
        "voicerelay_relay_audio_frames_total",
        "voicerelay_relay_audio_bytes_total",
        "voicerelay_relay_added_latency_seconds_bucket",
        "voicerelay_relay_upstream_connect_seconds_bucket",
        "voicerelay_relay_first_agent_audio_seconds_bucket",
        "voicerelay_relay_errors_total",
        "voicerelay_relay_connect_rejected_total",
        "voicerelay_relay_draining",
        "voicerelay_relay_pubsub_listener_up",
        "voicerelay_relay_pubsub_listener_restarts_total",
        "voicerelay_relay_call_log_buffered",
        "voicerelay_relay_call_log_dropped_total",
        "control_api_http_requests_total",
        "control_api_http_request_duration_seconds_bucket",
        "control_api_dependency_up",
    ):
        assert needed in read_metrics, needed


def test_quantiles_keep_the_bucket_label() -> None:
    for where, expr in _queries():
        if "histogram_quantile" in expr:
            groupings = read(expr).aggregations
            assert groupings, where
            assert all("le" in g.labels for g in groupings), where


def test_alert_rules_match_the_schema() -> None:
    alerts = _alerts()
    jsonschema.validate(alerts, ALERTS_SCHEMA)
    names = [rule["alert"] for group in alerts["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    for expected in (
        "RelayDown",
        "RelayDeafToRedis",
        "RelayErrorRateHigh",
        "RelayUpstreamFailures",
        "RelayCallLogEventsDropped",
        "ControlApiDown",
        "ControlApiDatabaseDown",
        "ControlApi5xxHigh",
    ):
        assert expected in names


def test_alert_annotations_only_use_labels_the_expression_keeps() -> None:
    for group in _alerts()["groups"]:
        for rule in group["rules"]:
            reading = read(rule["expr"])
            text = " ".join(rule["annotations"].values())
            used = {part.split()[0].rstrip("}") for part in text.split("$labels.")[1:]}
            if not used:
                continue
            outer = reading.aggregations
            # An aggregation keeps only its "by" labels; a bare selector keeps all of them.
            kept = set.intersection(*(set(a.labels) for a in outer)) if outer else None
            assert kept is None or used <= kept, (rule["alert"], used, kept)


# --- the bounded per-tenant gauge and the pool collector (no servers) ---------------------------


def test_tenant_calls_names_the_busiest_tenants_and_forgets_idle_ones() -> None:
    calls = TenantCalls(limit=2)
    for tenant, count in (("a", 3), ("b", 2), ("c", 1), ("d", 1)):
        for _ in range(count):
            calls.started(tenant)
    calls.ended("a")

    def series() -> dict[str, float]:
        (family,) = calls.collect()
        return {sample.labels["tenant"]: sample.value for sample in family.samples}

    assert series() == {"a": 2, "b": 2, "other": 2}
    for tenant in ("a", "a", "b", "b", "c", "d"):
        calls.ended(tenant)
    assert series() == {}
    calls.ended("never-started")  # an unmatched end must not go negative or raise
    assert series() == {}


def test_pubsub_listener_up_is_absent_on_a_lone_replica_and_0_when_any_listener_is_down() -> None:
    class Listener:
        healthy = True

    gauge = PubSubListenerUp()
    assert list(gauge.collect()) == []
    first, second = Listener(), Listener()
    gauge.track(first)
    gauge.track(second)
    assert [s.value for f in gauge.collect() for s in f.samples] == [1.0]
    second.healthy = False
    assert [s.value for f in gauge.collect() for s in f.samples] == [0.0]
    gauge.forget(second)  # a closed listener no longer counts
    assert [s.value for f in gauge.collect() for s in f.samples] == [1.0]


def test_pool_stats_are_absent_without_a_pool() -> None:
    assert list(PoolStats().collect()) == []


# --- live scrape --------------------------------------------------------------------------------


@dataclass
class Scrape:
    # Series name (with its _total/_bucket/... suffix) -> label names seen on its samples.
    labels: dict[str, set[str]] = field(default_factory=dict)
    # Series names with at least one sample (a labelled metric never touched has none).
    sampled: set[str] = field(default_factory=set)
    # Series name -> the sum of its samples' values.
    totals: dict[str, float] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.labels


_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def _parse(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        # A family declared with no sample yet still names its series.
        for suffix in _SERIES_SUFFIXES.get(family.type, ("",)):
            scrape.labels.setdefault(family.name + suffix, set())
        for sample in family.samples:
            scrape.labels.setdefault(sample.name, set()).update(sample.labels)
            scrape.sampled.add(sample.name)
            scrape.totals[sample.name] = scrape.totals.get(sample.name, 0.0) + sample.value
    return scrape


def _declared_labels(name: str) -> set[str]:
    """Label names of an in-process metric, for the rare counters that have no series yet."""
    from prometheus_client import REGISTRY

    collector = REGISTRY._names_to_collectors[name]  # noqa: SLF001 - test-only introspection
    return set(collector._labelnames)  # type: ignore[attr-defined]  # noqa: SLF001


async def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def _scrape(client: httpx.AsyncClient, url: str) -> Scrape:
    response = await client.get(url + "/metrics")
    assert response.status_code == 200
    return _parse(response.text)


@pytest.mark.timeout(120)
async def test_every_query_reads_metrics_and_labels_of_a_live_scrape(
    settings: Settings, tenant: Any
) -> None:
    async with (
        relay_stack(settings) as stack,
        httpx.AsyncClient(base_url=stack.api_url, timeout=10) as api,
        httpx.AsyncClient(timeout=10) as scraper,
    ):
        agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
        call = await stack.call(api, tenant, agent)
        async with call_client(stack.relay_url, call["token"]) as client:
            await client.wait_for("call.ready")
            voiced = pcm_tone(0.6)
            await stream(client, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
            await _eventually(lambda: len(client.audio()) >= len(voiced))
            # The per-tenant gauge only has series while the tenant has a call.
            during = await _scrape(scraper, stack.relay_url)
            await client.emit("call.end")
            await client.wait_for("call.ended")

        # A refused connect and a call whose agent never answers fill the error counters.
        with pytest.raises(ConnectRefused):
            async with call_client(stack.relay_url, "not-a-token"):
                pass
        silent = await stack.agent(api, tenant, EmulatedAgent(unresponsive=True))
        failing = await stack.call(api, tenant, silent)
        async with call_client(stack.relay_url, failing["token"]) as client:
            ended = await client.wait_for("call.ended", timeout=30)
            assert ended["reason"] == "upstream_unavailable"

        # The relay counts a failed call's error just after sending call.ended.
        async with asyncio.timeout(15):
            while (
                "voicerelay_relay_errors_total"
                not in (relay := await _scrape(scraper, stack.relay_url)).sampled
            ):
                await asyncio.sleep(0.05)
        control = await _scrape(scraper, stack.api_url)

    tenant_calls = "voicerelay_relay_tenant_active_calls"
    assert tenant_calls in during.sampled
    assert "tenant" in during.labels[tenant_calls]
    relay.labels[tenant_calls] = during.labels[tenant_calls]
    relay.sampled.add(tenant_calls)
    # In production the relay and the API are separate processes with separate registries;
    # here they share one, so each metric is looked up in the endpoint that serves it for real.
    problems: list[str] = []
    for where, expr in _queries():
        reading = read(expr)
        for metric in reading.metrics - SYNTHETIC_METRICS:
            scrape = relay if metric.startswith("voicerelay_relay_") else control
            if metric not in scrape:
                problems.append(f"{where}: {metric} is not in the scrape")
                continue
            if metric in scrape.sampled:
                labels = scrape.labels[metric]
            elif metric in RARE:
                labels = _declared_labels(metric)
            else:
                problems.append(f"{where}: {metric} has no samples after a real call")
                continue
            used = set(reading.matchers.get(metric, set()))
            for aggregation in reading.aggregations:
                if metric in aggregation.metrics:
                    used |= aggregation.labels
            missing = used - labels - TARGET_LABELS
            if missing:
                problems.append(f"{where}: {metric} has no label(s) {sorted(missing)}")
    assert not problems, "\n".join(problems)
    # Every histogram a quantile is drawn from has observations (an empty one renders nothing).
    for where, expr in _queries():
        for metric in metric_names(expr):
            if metric.endswith("_bucket"):
                scrape = relay if metric.startswith("voicerelay_relay_") else control
                count = metric.removesuffix("_bucket") + "_count"
                assert scrape.totals.get(count, 0) > 0, f"{where}: {count} has no observation"
