"""The quick bench runs every scenario and reports a figure or a skip for each.

The test checks that scripts/bench.py runs and measures. It never checks how
fast anything is, because timings on a shared CI machine vary too much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import is_listening, require_service

REPOSITORY = Path(__file__).resolve().parents[1]
BENCH = REPOSITORY / "scripts" / "bench.py"
BENCH_TIMEOUT_S = 120

# Figures that every quick bench must produce, by scenario.
REQUIRED_FIGURES = {
    "relay": [
        "sqlite.1_stage.raw_per_stage",
        "sqlite.1_stage.raw_pipeline_end_to_end",
        "sqlite.1_stage.raw_pipeline_per_stage",
        "sqlite.1_stage.engine_end_to_end",
        "sqlite.1_stage.engine_over_raw",
        "sqlite.1_stage.engine_over_raw_pipeline",
        "sqlite.3_stage.raw_per_stage",
        "sqlite.3_stage.raw_pipeline_end_to_end",
        "sqlite.3_stage.raw_pipeline_per_stage",
        "sqlite.3_stage.engine_per_stage",
        "sqlite.3_stage.engine_over_raw",
        "sqlite.3_stage.engine_over_raw_pipeline",
    ],
    "cpu": [
        "plain_loop_s",
        "two_processes_s",
        "engine_1_s",
        "engine_2_s",
        "engine_2_over_ceiling",
    ],
    "wordcount": [
        "counter.included_s",
        "pool.included_s",
        "pool.excluded_s",
        "engine_example.included_s",
        "engine_example.excluded_s",
        "engine_per_chunk.included_s",
        "engine_per_chunk.excluded_s",
        "engine_example.over_counter.included",
    ],
    "startup": [
        "first_item_s",
        "exit_s",
        "bare_python_mb",
        "master_mb",
        "worker_mb",
        "source_node_mb",
        "sink_node_mb",
    ],
}
RABBITMQ_FIGURES = [
    "rabbitmq.1_stage.raw_per_stage",
    "rabbitmq.1_stage.raw_pipeline_end_to_end",
    "rabbitmq.1_stage.raw_pipeline_per_stage",
    "rabbitmq.1_stage.engine_end_to_end",
    "rabbitmq.1_stage.engine_over_raw_pipeline",
    "rabbitmq.3_stage.raw_pipeline_per_stage",
    "rabbitmq.3_stage.engine_over_raw",
    "rabbitmq.3_stage.engine_over_raw_pipeline",
]
PEERS = ("ray", "dask", "dramatiq")


def run_quick_bench(json_path: Path) -> str:
    """Run `scripts/bench.py --quick --json json_path` and return its output."""
    try:
        result = subprocess.run(
            [sys.executable, str(BENCH), "--quick", "--json", str(json_path)],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=BENCH_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the quick bench took over {BENCH_TIMEOUT_S} s:\n{exc.stdout}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the quick bench failed:\n{output}"
    return output


# One test for the whole bench, so that it runs once even under pytest-xdist.
# The default timeout of 120 s would end it before the bench's own timeout.
@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_quick_bench_reports_every_scenario(tmp_path: Path) -> None:
    has_rabbitmq = is_listening("127.0.0.1", 5672)
    if not has_rabbitmq and os.environ.get("CI") == "true":
        require_service("RabbitMQ", 5672)

    output = run_quick_bench(tmp_path / "bench.json")
    outcome = json.loads((tmp_path / "bench.json").read_text())
    scenarios = outcome["scenarios"]

    for name, keys in REQUIRED_FIGURES.items():
        figures = scenarios[name]["figures"]
        for key in keys:
            assert key in figures, f"{name} lacks figure {key}: {sorted(figures)}"
    for name, scenario in scenarios.items():
        for key, figure in scenario["figures"].items():
            assert figure["min"] > 0, f"{name} figure {key} has min {figure['min']}"

    wordcount = scenarios["wordcount"]
    for peer in PEERS:
        if f"{peer}.included_s" in wordcount["figures"]:
            assert f"{peer}.excluded_s" in wordcount["figures"]
            continue
        assert peer in wordcount["skipped"], f"{peer} is neither measured nor skipped"
        note = f"skipped {peer} in wordcount: {wordcount['skipped'][peer]}"
        assert note in output, f"the bench did not print {note!r}"

    # The relay targets are checked against the raw pipeline, and print the
    # ratio to the single raw loop beside it.
    relay_targets = {
        target["name"]: target
        for target in outcome["targets"]
        if target["scenario"] == "relay"
    }
    for stages in ("1 stage", "3 stages"):
        target = relay_targets[f"relay per stage, sqlite, {stages}"]
        assert target["status"] != "not measured", f"target not measured: {target}"
        assert "raw pipeline" in target["goal"], f"target goal: {target['goal']}"
        assert target["note"].startswith("raw loop: "), f"target note: {target}"

    relay = scenarios["relay"]
    if not has_rabbitmq:
        assert "rabbitmq" in relay["skipped"], "relay on RabbitMQ was not skipped"
        require_service("RabbitMQ", 5672)
    for key in RABBITMQ_FIGURES:
        assert key in relay["figures"], f"relay lacks figure {key}"
