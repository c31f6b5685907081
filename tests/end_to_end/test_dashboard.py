"""The metrics and the dashboard of a real `engine run --hold`.

Each test starts `engine run --hold` in a subprocess, in its own folder, and
reads the control API that `.monomyth/control.json` names. The browser test
drives Debian's /usr/bin/chromium through Playwright and saves a screenshot
to test-artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import Pipeline
from engine.api import ControlAPI
from engine.master import Master
from tests.end_to_end.conftest import REPOSITORY, engine_command
from tests.helpers import wait_for

# 60 items; every 20th fails in `check` without retries, so 3 fail.
SMALL = """
from engine import Pipeline

pipeline = Pipeline("small")


@pipeline.source(batch_size=7)
def numbers(ctx):
    for number in range(60):
        ctx.report_progress(number + 1, 60)
        yield number


@pipeline.transform(after="numbers", batch_size=5, retries=0)
def check(number):
    if number % 20 == 3:
        raise ValueError(f"unlucky number {number}")
    return number * 2


@pipeline.sink(after="check", batch_size=4)
def store(number):
    pass
"""

# About 8 seconds of work, in small batches, so that counts rise visibly.
SLOW = """
import time

from engine import Pipeline

pipeline = Pipeline("slow")


@pipeline.source(batch_size=5, batch_timeout_s=0.05)
def numbers(ctx):
    for number in range(400):
        ctx.report_progress(number, 400)
        time.sleep(0.02)
        yield number
    ctx.report_progress(400, 400)


@pipeline.transform(after="numbers", batch_size=5, processes=2)
def square(number):
    time.sleep(0.005)
    return number * number


@pipeline.sink(after="square", batch_size=5)
def store(number):
    pass
"""

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPOSITORY / "test-artifacts" / "dashboard.png"


class HeldRun:
    """`engine run --hold` in a subprocess, with its output collected."""

    def __init__(self, pipeline: Path, cwd: Path) -> None:
        environment = dict(os.environ)
        environment.pop("MONOMYTH_SECRET", None)
        self.cwd = cwd
        self.process = subprocess.Popen(
            [engine_command(), "run", str(pipeline), "--hold"],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            threading.Thread(
                target=_collect_lines, args=(stream, lines), daemon=True
            ).start()

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def api_url(self) -> str:
        """Wait for the discovery file and return the API's base URL."""
        discovery = self.cwd / ".monomyth" / "control.json"
        wait_for(
            lambda: discovery.exists() or self.process.poll() is not None,
            timeout_s=60,
            what="the discovery file of engine run",
        )
        assert self.process.poll() is None, self.output
        return json.loads(discovery.read_text())["api"]

    def interrupt(self) -> int:
        """Send SIGINT, as Ctrl-C does, and return the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _collect_lines(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Any]:
    """Yield a function that starts `engine run --hold` on a pipeline source."""
    runs: list[HeldRun] = []

    def start(source: str) -> HeldRun:
        pipeline = tmp_path / "pipeline.py"
        pipeline.write_text(source)
        run = HeldRun(pipeline, tmp_path)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@dataclass
class Reply:
    status: int
    headers: Any
    text: str


def fetch(url: str) -> Reply:
    """GET `url` and return the reply, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return Reply(response.status, response.headers, response.read().decode())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read().decode())


def generate():
    yield 1


def passthrough(item):
    return item


def consume(item):
    pass


def is_done(api: str, pipeline: str) -> bool:
    return json.loads(get(api + "/status"))["pipelines"][pipeline]["done"]


def parse_summary(stdout: str) -> dict[str, dict[str, int]]:
    """Return {node: {in, out, failed, restarts}} from the printed summary."""
    lines = stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:2] == ["node", "state"]
    )
    summary = {}
    for line in lines[header + 1 :]:
        fields = line.split()
        if len(fields) != 6 or not fields[2].isdigit():
            break
        node, _, items_in, items_out, failed, restarts = fields
        summary[node] = {
            "in": int(items_in),
            "out": int(items_out),
            "failed": int(failed),
            "restarts": int(restarts),
        }
    return summary


def metric_values(text: str) -> dict[tuple[str, str], float]:
    """Return {(sample name, node_type): value} of the per-type samples."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if set(sample.labels) == {"node_type"}:
                values[sample.name, sample.labels["node_type"]] = sample.value
    return values


def test_metrics_match_run_summary(start_run) -> None:
    run = start_run(SMALL)
    api = run.api_url()

    wait_for(lambda: is_done(api, "small"), timeout_s=60, what="pipeline small done")
    wait_for(
        lambda: "holding:" in "".join(run.stdout),
        timeout_s=60,
        what="the summary and the hold message",
    )
    text = get(api + "/metrics")
    summary = parse_summary("".join(run.stdout))
    values = metric_values(text)

    assert set(summary) == {"numbers", "check", "store"}
    for node, numbers in summary.items():
        node_type = f"small.{node}"
        assert values["monomyth_items_processed_total", node_type] == numbers["in"]
        assert values["monomyth_items_produced_total", node_type] == numbers["out"]
        assert values["monomyth_items_failed_total", node_type] == numbers["failed"]
        assert values["monomyth_node_restarts_total", node_type] == numbers["restarts"]
    assert summary["check"] == {"in": 60, "out": 57, "failed": 3, "restarts": 0}
    # Every batch of a transform or sink was timed.
    assert values["monomyth_batch_duration_seconds_count", "small.check"] >= 12
    assert values["monomyth_batch_duration_seconds_count", "small.store"] >= 15
    assert values["monomyth_progress_ratio", "small.numbers"] == 1.0
    assert 'monomyth_queue_depth{queue="small.check-fail"} 3' in text
    assert 'monomyth_workers{state="stopped"} 1' in text

    exit_code = run.interrupt()

    assert exit_code == 3, run.output
    assert not (run.cwd / ".monomyth" / "control.json").exists()


def test_api_serves_graph_status_and_files(start_run) -> None:
    run = start_run(SMALL)
    api = run.api_url()
    wait_for(lambda: is_done(api, "small"), timeout_s=60, what="pipeline small done")

    graph = json.loads(get(api + "/graph"))["pipelines"]["small"]
    status = json.loads(get(api + "/status"))
    page = fetch(api + "/")
    script = fetch(api + "/assets/app.js")
    style = fetch(api + "/assets/style.css")
    missing = fetch(api + "/assets/missing.js")

    columns = {node["node"]: node["column"] for node in graph["nodes"]}
    assert columns == {"numbers": 0, "check": 1, "store": 2}
    assert graph["edges"] == [
        {
            "from": "small.numbers",
            "to": "small.check",
            "queue": "small.numbers-to-check",
        },
        {"from": "small.check", "to": "small.store", "queue": "small.check-to-store"},
    ]
    assert set(status["nodes"]) == {"small.numbers#1", "small.check#1", "small.store#1"}
    assert status["nodes"]["small.check#1"]["worker_id"] == "worker-1"
    assert status["types"]["small.numbers"]["progress_done"] == 60
    assert status["types"]["small.numbers"]["progress_total"] == 60

    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert '<script src="/assets/app.js"' in page.text
    assert fetch(api + "/dashboard").text == page.text
    assert script.status == 200
    assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert style.headers["Content-Type"] == "text/css; charset=utf-8"
    assert missing.status == 404
    assert "dashboard file 'missing.js' not found" in missing.text
    assert run.interrupt() == 3, run.output


def test_graph_columns_follow_longest_path(tmp_path: Path) -> None:
    # a -> b -> c -> d, plus the shortcut a -> d: d sits after c, not after a.
    pipeline = Pipeline("diamond")
    pipeline.add("source", "a", generate)
    pipeline.add("transform", "b", passthrough, after="a")
    pipeline.add("transform", "c", passthrough, after="b")
    pipeline.add("sink", "d", consume, after=["a", "c"])
    master = Master(b"secret", f"sqlite:///{tmp_path}/s.db")
    master.add_pipeline(pipeline, {})
    api = ControlAPI(master, "127.0.0.1", 0, None, master.stream_url)
    api.start()
    try:
        graph = json.loads(get(api.url + "/graph"))["pipelines"]["diamond"]
    finally:
        api.close()

    columns = {node["node"]: node["column"] for node in graph["nodes"]}
    queues = [edge["queue"] for edge in graph["edges"]]
    assert columns == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert sorted(queues) == [
        "diamond.a-to-b",
        "diamond.a-to-d",
        "diamond.b-to-c",
        "diamond.c-to-d",
    ]
    assert graph["nodes"][3]["fail_queue"] == "diamond.d-fail"


def require_browser() -> Any:
    """Return Playwright's sync API; skip without a browser, but fail under CI."""
    reason = ""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing; install it with apt-get install chromium"
    try:
        from playwright import sync_api
    except ImportError:
        reason = "the playwright package is missing; pip install -e '.[test]'"
    if not reason:
        return sync_api
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must provide it")
    pytest.skip(reason)


def cell_count(page: Any, row: str, field: str) -> int:
    text = page.locator(f'{row} [data-field="{field}"]').inner_text(timeout=10_000)
    return int(text.replace(",", "") or 0)


def test_dashboard_shows_live_run(start_run, tmp_path: Path) -> None:
    sync_api = require_browser()
    run = start_run(SLOW)
    api = run.api_url()
    errors: list[str] = []

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda message: (
                    errors.append(message.text) if message.type == "error" else None
                ),
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(api + "/", timeout=30_000)

            page.wait_for_selector(
                '#workers tr[data-worker-id="worker-1"]', timeout=30_000
            )
            for node_type in ("slow.numbers", "slow.square", "slow.store"):
                page.wait_for_selector(
                    f'#node-types tr[data-node-type="{node_type}"]', timeout=30_000
                )
                page.wait_for_selector(
                    f'#graph g.node[data-node-type="{node_type}"]', timeout=30_000
                )
            row = '#node-types tr[data-node-type="slow.numbers"]'
            first = cell_count(page, row, "items-out")
            wait_for(
                lambda: cell_count(page, row, "items-out") > first,
                timeout_s=30,
                what="the items out of slow.numbers to rise on the page",
            )
            worker_state = page.locator(
                '#workers tr[data-worker-id="worker-1"] [data-field="state"]'
            ).inner_text()
            node_rows = page.locator('#nodes tr[data-node-id^="slow.square#"]').count()
            edge = page.locator('#graph g.edge[data-queue="slow.numbers-to-square"]')
            edge_count = edge.count()
            edge_depth = edge.locator('[data-field="depth"]').text_content()

            # The finished run stays on the page while engine run holds.
            page.wait_for_selector(
                '#pipelines li[data-pipeline="slow"][data-done="true"]', timeout=60_000
            )
            progress = page.locator(f'{row} [data-field="progress"]').get_attribute(
                "data-percent"
            )
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()

    assert worker_state == "joined"
    assert node_rows == 2
    assert edge_count == 1
    assert edge_depth.replace(",", "").isdigit()
    assert progress == "100.0%"
    assert errors == []
    assert run.interrupt() == 0, run.output
