"""examples/tradebalancer-alerts.yml, the sample alerting rules, checked and run by promtool.

`promtool check rules` proves the file loads; `promtool test rules` feeds each alert series of
the balancer's metric names, as Prometheus would scrape them, and states when it must fire and
when it must stay quiet. The expected annotations are the rule file's own templates, read back
as JSON from a real Prometheus that loaded the file, and rendered here by hand for each case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_server import Prometheus, promtool, require_prometheus

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "examples" / "tradebalancer-alerts.yml"


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every alerting rule of the file by name, as the Prometheus that loaded it reports it."""
    require_prometheus()
    with Prometheus(tmp_path_factory.mktemp("prometheus"), [], [ALERTS]) as prometheus:
        groups = prometheus.api("/api/v1/rules")["groups"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


def test_the_rule_file_passes_promtool_check_rules() -> None:
    """`promtool check rules` accepts the shipped alert rules, all four of them."""
    require_prometheus()
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout


def test_every_rule_is_an_alert_with_a_severity_a_summary_and_a_description(
    rules: dict[str, dict[str, Any]],
) -> None:
    """Each rule is an alert that says how bad (severity) and what happened (summary, text)."""
    assert set(rules) == {
        "TradebalancerBehindTheMarket",
        "TradebalancerNoEvents",
        "TradebalancerWorkerRestarting",
        "TradebalancerRejectingFrames",
    }
    for name, rule in rules.items():
        assert rule["type"] == "alerting", name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "tradebalancer_" in rule["query"], name


def expected(
    rules: dict[str, dict[str, Any]], name: str, labels: dict[str, str], summary: str
) -> dict[str, Any]:
    """One alert as promtool must see it: the rule's labels and annotations, its summary given."""
    rule = rules[name]
    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {**rule["annotations"], "summary": summary},
    }


def delay_buckets(instance: str, bucket: str, steps: int) -> list[dict[str, str]]:
    """A market-delay histogram whose events, 100 a scrape, all fall at and above ``bucket``."""
    bounds = ["0.5", "1", "2.5", "5", "10", "+Inf"]
    return [
        {
            "series": (
                f'tradebalancer_market_delay_seconds_bucket{{instance="{instance}",le="{le}"}}'
            ),
            "values": f"0+100x{steps}" if float(le) >= float(bucket) else f"0+0x{steps}",
        }
        for le in bounds
    ]


def run_promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    unit = tmp_path / "alerts-test.yml"
    unit.write_text(
        json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "15s", "tests": tests})
    )
    result = promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_behind_the_market_fires_after_a_minute_of_a_median_delay_over_5_s(
    tmp_path: Path, rules: dict[str, dict[str, Any]]
) -> None:
    """Events 5-10 s late for over a minute fire the alert; events under 1 s late never do."""
    name = "TradebalancerBehindTheMarket"
    series = delay_buckets("late:9100", "10", 20) + delay_buckets("prompt:9100", "1", 20)
    run_promtool_test(
        tmp_path,
        [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": name, "exp_alerts": []},  # pending
                    {
                        "eval_time": "3m",
                        "alertname": name,
                        "exp_alerts": [
                            expected(
                                rules,
                                name,
                                {"instance": "late:9100"},
                                "late:9100: events arrive 7.5s behind the market",
                            )
                        ],
                    },
                ],
            }
        ],
    )


def test_no_events_fires_only_while_streaming(
    tmp_path: Path, rules: dict[str, dict[str, Any]]
) -> None:
    """A streaming balancer whose events stop fires 2 minutes later; a busy or a down one not."""
    name = "TradebalancerNoEvents"
    state = 'tradebalancer_connection_state{{instance="{}",state="{}"}}'
    events = 'tradebalancer_events_received_total{{instance="{}"}}'
    series = [  # a sample every 15 s for 5 minutes; the silent one's events stop at 2 minutes
        {"series": events.format("silent:9100"), "values": "0+300x8 2400x12"},
        {"series": state.format("silent:9100", "streaming"), "values": "1x20"},
        {"series": events.format("busy:9100"), "values": "0+300x20"},
        {"series": state.format("busy:9100", "streaming"), "values": "1x20"},
        {"series": events.format("down:9100"), "values": "700x20"},
        {"series": state.format("down:9100", "streaming"), "values": "0x20"},
        {"series": state.format("down:9100", "reconnecting"), "values": "1x20"},
    ]
    summary = "silent:9100: streaming, but no events for 2 minutes"
    silent = [expected(rules, name, {"instance": "silent:9100"}, summary)]
    alerts = [
        {"eval_time": "2m", "alertname": name, "exp_alerts": []},
        {"eval_time": "3m45s", "alertname": name, "exp_alerts": []},  # pending
        {"eval_time": "4m", "alertname": name, "exp_alerts": silent},
    ]
    run_promtool_test(
        tmp_path, [{"interval": "15s", "input_series": series, "alert_rule_test": alerts}]
    )


def test_worker_restarting_fires_on_the_third_restart_in_15_minutes(
    tmp_path: Path, rules: dict[str, dict[str, Any]]
) -> None:
    """Three restarts of one worker in 15 minutes fire for that worker; one restart does not."""
    name = "TradebalancerWorkerRestarting"
    restarts = 'tradebalancer_worker_restarts_total{{instance="a:9100",worker="{}"}}'
    series = [
        {"series": restarts.format(0), "values": "0 1 1 2 2 3 3 3 3 3"},
        {"series": restarts.format(1), "values": "0 0 1 1 1 1 1 1 1 1"},
    ]
    alerts = [
        {"eval_time": "1m", "alertname": name, "exp_alerts": []},
        {
            "eval_time": "2m",
            "alertname": name,
            "exp_alerts": [
                expected(
                    rules,
                    name,
                    {"instance": "a:9100", "worker": "0"},
                    "a:9100: worker 0 restarted 3 times in 15 minutes",
                )
            ],
        },
    ]
    run_promtool_test(
        tmp_path, [{"interval": "15s", "input_series": series, "alert_rule_test": alerts}]
    )


def test_rejecting_frames_fires_at_once_and_ends_five_minutes_after_the_last(
    tmp_path: Path, rules: dict[str, dict[str, Any]]
) -> None:
    """A rejected frame fires the alert with its reason; five quiet minutes later it is over."""
    name = "TradebalancerRejectingFrames"
    series = [
        {
            "series": (
                'tradebalancer_frames_rejected_total{instance="a:9100",reason="invalid_json"}'
            ),
            "values": "0 0 0 0 2x30",  # two frames rejected at 1 minute, none after
        }
    ]
    firing = expected(
        rules,
        name,
        {"instance": "a:9100", "reason": "invalid_json"},
        "a:9100: 2 frames rejected (invalid_json) in 5 minutes",
    )
    alerts = [
        {"eval_time": "45s", "alertname": name, "exp_alerts": []},
        {"eval_time": "1m15s", "alertname": name, "exp_alerts": [firing]},
        {"eval_time": "7m", "alertname": name, "exp_alerts": []},
    ]
    run_promtool_test(
        tmp_path, [{"interval": "15s", "input_series": series, "alert_rule_test": alerts}]
    )
