"""Kill processes of a running word count at random and check its exact result.

    python scripts/chaos.py --stream sqlite --seed 7
    python scripts/chaos.py --stream rabbitmq --seed 7 --chunks 4000

The script generates a corpus, starts `engine master` with the word-count
example and two `engine worker` processes, then, at seeded random moments,
kills with SIGKILL: node processes, one worker (and starts a new one), and
the master (and starts it again). With `--stream rabbitmq` it also cuts every
broker connection once, by restarting a TCP proxy that sits between the
engine and the broker (`--restart-broker real` restarts the broker itself
with rabbitmqctl instead, which disturbs every other user of that broker).
At the end the counts must equal a single-process `collections.Counter`.
Exit code 0 when they do, 1 when they differ or the run did not finish.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil

REPOSITORY = Path(__file__).resolve().parents[1]
WORDCOUNT = REPOSITORY / "examples" / "wordcount.py"
BROKER = ("127.0.0.1", 5672)


def engine_command() -> str:
    beside_python = Path(sys.executable).parent / "engine"
    return str(beside_python) if beside_python.exists() else "engine"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_corpus(folder: Path, chunks: int, rng: random.Random) -> Counter:
    """Write about `chunks` chunks of 10 lines; return their word counts."""
    words = [f"w{i}" for i in range(500)] + ["the", "and", "Of", "ÉTÉ"]
    folder.mkdir(parents=True)
    expected: Counter = Counter()
    files = max(1, chunks // 50)
    for index in range(files):
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(0, 9)))
            for _ in range(500)
        ]
        text = "\n".join(lines) + "\n"
        (folder / f"part{index:04d}.txt").write_text(text)
        expected.update(text.lower().split())
    return expected


class Proxy:
    """A TCP proxy on loopback, whose restart cuts every connection through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        self.stopping.clear()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
        pairs: dict[socket.socket, socket.socket] = {}
        while not self.stopping.is_set():
            for key, _ in selector.select(timeout=0.2):
                if key.data is None:
                    client, _ = listener.accept()
                    try:
                        upstream = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    for end in (client, upstream):
                        end.setblocking(False)
                        selector.register(end, selectors.EVENT_READ, "peer")
                    pairs[client], pairs[upstream] = upstream, client
                    continue
                source = key.fileobj
                try:
                    data = source.recv(65536)
                    if data:
                        pairs[source].sendall(data)
                        continue
                except OSError:
                    pass
                self._close_pair(selector, pairs, source)
        for end in list(pairs):
            self._close_pair(selector, pairs, end)
        selector.close()
        listener.close()

    @staticmethod
    def _close_pair(selector, pairs, end) -> None:
        other = pairs.pop(end, None)
        for sock in (end, other):
            if sock is None:
                continue
            pairs.pop(sock, None)
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            sock.close()


class Chaos:
    """The processes of one chaos run and the faults injected into them."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.rng = random.Random(args.seed)
        self.port = free_port()
        self.secret = folder / "secret"
        self.secret.write_text(uuid.uuid4().hex)
        self.workers: list[subprocess.Popen] = []
        self.master: subprocess.Popen | None = None
        self.events: list[str] = []
        self.proxy: Proxy | None = None
        self.vhost: str | None = None

    def log(self, event: str) -> None:
        line = f"chaos: {event}"
        self.events.append(line)
        print(line, flush=True)

    def stream_url(self) -> str:
        if self.args.stream == "sqlite":
            return f"sqlite:///{self.folder}/stream.db"
        host_port = f"127.0.0.1:{self.proxy.port}" if self.proxy else "127.0.0.1:5672"
        return f"amqp://guest:guest@{host_port}/{self.vhost}"

    def spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("a")
        return subprocess.Popen(
            [engine_command(), *args],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start_master(self) -> None:
        self.master = self.spawn(
            [
                "master",
                str(WORDCOUNT),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--secret-file",
                str(self.secret),
                "--api",
                "off",
                "--stream",
                self.stream_url(),
                "--exit-when-done",
                "--workers",
                "2",
                "--worker-timeout",
                "3",
                "-p",
                f"input={self.folder / 'corpus'}",
                "-p",
                f"output={self.folder / 'counts.db'}",
            ],
            "master",
        )

    def start_worker(self) -> None:
        number = len(self.workers) + 1
        self.workers.append(
            self.spawn(
                [
                    "worker",
                    "--master",
                    f"127.0.0.1:{self.port}",
                    "--secret-file",
                    str(self.secret),
                    "--connect-timeout",
                    "30",
                ],
                f"worker-{number}",
            )
        )

    def live_workers(self) -> list[subprocess.Popen]:
        return [worker for worker in self.workers if worker.poll() is None]

    def node_processes(self) -> list[psutil.Process]:
        children = []
        for worker in self.live_workers():
            try:
                children += psutil.Process(worker.pid).children()
            except psutil.Error:
                continue
        nodes = []
        for child in children:
            command = " ".join(_cmdline(child))
            if "multiprocessing.forkserver" in command:
                # The worker's forkserver is no node, but its children are.
                with contextlib.suppress(psutil.Error):
                    nodes += child.children()
            elif "resource_tracker" not in command:
                # Nodes that the worker started with `spawn`.
                nodes.append(child)
        return nodes

    def inject(self, fault: str) -> None:
        if fault == "node":
            nodes = self.node_processes()
            if nodes:
                victim = self.rng.choice(nodes)
                self.log(f"SIGKILL node process pid={victim.pid}")
                _kill(victim.pid)
        elif fault == "worker":
            workers = self.live_workers()
            if workers:
                victim = self.rng.choice(workers)
                self.log(f"SIGKILL worker pid={victim.pid}; starting a new worker")
                _kill(victim.pid)
                self.start_worker()
        elif fault == "master":
            self.log(f"SIGKILL master pid={self.master.pid}; starting it again")
            _kill(self.master.pid)
            self.master.wait()
            time.sleep(self.rng.uniform(0.2, 1.5))
            self.start_master()
        elif fault == "broker":
            self.restart_broker()

    def restart_broker(self) -> None:
        if self.args.restart_broker == "real":
            self.log("restarting RabbitMQ with rabbitmqctl stop_app/start_app")
            subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True)
            time.sleep(1.0)
            subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True)
        else:
            self.log("cutting every broker connection: restarting the proxy")
            self.proxy.stop()
            time.sleep(1.0)
            self.proxy.start()

    def faults(self) -> list[str]:
        faults = ["node"] * self.args.node_kills + ["worker", "master"]
        if self.args.stream == "rabbitmq":
            faults.append("broker")
        self.rng.shuffle(faults)
        return faults

    def run(self) -> int:
        expected = write_corpus(self.folder / "corpus", self.args.chunks, self.rng)
        if self.args.stream == "rabbitmq":
            self.vhost = f"monomyth-chaos-{uuid.uuid4().hex[:10]}"
            _rabbitmqctl("add_vhost", self.vhost)
            _rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
            if self.args.restart_broker == "proxy":
                self.proxy = Proxy(BROKER)
                self.proxy.start()
        try:
            return self._run(expected)
        finally:
            self.stop_all()
            if self.proxy is not None:
                self.proxy.stop()
            if self.vhost is not None:
                _rabbitmqctl("delete_vhost", self.vhost, check=False)

    def _run(self, expected: Counter) -> int:
        self.start_master()
        self.start_worker()
        self.start_worker()
        deadline = time.monotonic() + self.args.timeout
        # Faults start once nodes run: a node process exists under a worker.
        while not self.node_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for fault in self.faults():
            time.sleep(self.rng.uniform(0.3, self.args.spacing))
            if self.master.poll() is not None:
                self.log(f"run finished before the fault {fault!r}")
                break
            self.inject(fault)
        while self.master.poll() is None:
            if time.monotonic() > deadline:
                self.log(f"run did not finish within {self.args.timeout} s")
                return 1
            time.sleep(0.2)
        if self.master.returncode != 0:
            self.log(f"master exited with code {self.master.returncode}")
            return 1
        counts = read_counts(self.folder / "counts.db")
        if counts != expected:
            missing = sum((expected - counts).values())
            extra = sum((counts - expected).values())
            self.log(f"counts differ: {missing} words missing, {extra} extra")
            return 1
        self.log(
            f"counts equal the single-process count ({sum(counts.values())} words)"
        )
        return 0

    def stop_all(self) -> None:
        for process in [self.master, *self.workers]:
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def read_counts(database: Path) -> Counter:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT word, count FROM word_counts").fetchall()
    connection.close()
    return Counter(dict(rows))


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _rabbitmqctl(*args: str, check: bool = True) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", choices=("sqlite", "rabbitmq"), default="sqlite")
    parser.add_argument("--seed", type=int, default=1, help="Seed of every choice.")
    parser.add_argument(
        "--chunks", type=int, default=2000, help="Chunks of 10 lines to count."
    )
    parser.add_argument(
        "--node-kills", type=int, default=4, help="Node processes to kill."
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=2.0,
        help="Maximum pause between two faults, in seconds.",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="Seconds the run may take."
    )
    parser.add_argument(
        "--restart-broker",
        choices=("proxy", "real"),
        default="proxy",
        help="How to restart the broker once: cut its connections through a "
        "proxy, or restart RabbitMQ itself.",
    )
    parser.add_argument(
        "--folder", type=Path, help="Working folder; default: a new temporary one."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        return Chaos(args, args.folder).run()
    with tempfile.TemporaryDirectory(prefix="monomyth-chaos-") as folder:
        return Chaos(args, Path(folder)).run()


if __name__ == "__main__":
    sys.exit(main())
