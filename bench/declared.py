#!/usr/bin/env python3
"""What declaring mappings in the config file costs (issue 23, part 3): a server
whose `server.toml` declares N direct mappings, timed from the daemon's own
notifications (NOTIFY_SOCKET), not from sleeps:

  first start    every mapping created and stored (one transaction each)
  restart        restored from SQLite, then reconciled with the file (no change)
  reload, same   SIGHUP with the file unchanged: RELOADING=1 -> READY=1
  reload, policy SIGHUP with every mapping's description and cap changed

During the policy reload one visitor connection stays open on a declared mapping
and echoes 64 bytes every 10 ms: the figure is whether it survived and its longest
round trip, against its longest round trip in the unchanged reload. `/api/mapping/list`
is polled meanwhile, since a reconcile holds the mappings' lock as an API change does.

    python3 bench/declared.py [--mappings 500] [--rounds 3] [--binary target/release/tunneld] [--no-build]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process and port helpers)


def echo_target() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def write_config(path: Path, ports: list[int], target: int, edition: int) -> None:
    lines = ['[server]\nbind_addr = "127.0.0.1"\n']
    for port in ports:
        lines.append(f'[[mappings]]\nsource_port = {port}\ntarget_host = "127.0.0.1"\ntarget_port = {target}\n'
                     f'description = "edition {edition}"\nbandwidth_limit = {100_000_000 + edition}\n')
    path.write_text("\n".join(lines))


class Server:
    def __init__(self, binary: Path, procs: bench.Children, tmp: Path, config: Path, name: str):
        self.procs, self.api = procs, f"http://127.0.0.1:{bench.free_port()}"
        self.notify = bench.Notify(tmp / f"{name}.notify")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
        env.update(RUST_LOG="warn", NOTIFY_SOCKET=str(self.notify.path))
        start = time.perf_counter()
        self.proc = procs.spawn(name, [
            str(binary), "server", "--config", str(config), "--api-listen", self.api.removeprefix("http://"),
            "--tunnel-listen", f"127.0.0.1:{bench.free_port()}", "--state-dir", str(tmp / "state"), "--secret", "bench-secret",
        ], env=env)
        self.notify.wait("READY=1", procs, self.proc, timeout=600)
        self.ready_ms = (time.perf_counter() - start) * 1000

    def reload(self) -> float:
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGHUP)
        self.notify.wait("RELOADING=1", self.procs, self.proc, timeout=600)
        self.notify.wait("READY=1", self.procs, self.proc, timeout=600)
        return (time.perf_counter() - start) * 1000

    def stop(self) -> None:
        self.procs.stop(self.proc, timeout=30)
        self.notify.sock.close()


class Watch:
    """An open visitor connection echoing every 10 ms, and the API polled, while a reload runs."""

    def __init__(self, server: Server, port: int):
        self.conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.stop, self.rtts, self.lists, self.error = threading.Event(), [], [], None
        self.threads = [threading.Thread(target=self.echo), threading.Thread(target=self.poll, args=(server.api,))]
        for t in self.threads:
            t.start()

    def echo(self) -> None:
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                self.conn.sendall(b"x" * 64)
                got = 0
                while got < 64:
                    chunk = self.conn.recv(64 - got)
                    if not chunk:
                        raise ConnectionError("closed by the server")
                    got += len(chunk)
                self.rtts.append((time.perf_counter() - start) * 1000)
                time.sleep(0.01)
        except OSError as e:
            self.error = str(e)

    def poll(self, api: str) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            bench.http_json(api + "/api/mapping/list")
            self.lists.append((time.perf_counter() - start) * 1000)
            time.sleep(0.01)

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.conn.close()
        return {"survived": self.error is None, "error": self.error, "echo_max_ms": max(self.rtts, default=None),
                "echoes": len(self.rtts), "list_max_ms": max(self.lists, default=None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mappings", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", type=Path, default=bench.REPO / "target/release/tunneld")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if not args.no_build and subprocess.run(["cargo", "build", "--release"], cwd=bench.REPO).returncode != 0:
        raise bench.BenchError("cargo build --release failed")
    bench.raise_fd_limit(4 * args.mappings + 1000)
    target = echo_target()
    figures: dict[str, list] = {"first_start_ms": [], "restart_ms": [], "reload_same_ms": [], "reload_policy_ms": [],
                                "watch_same": [], "watch_policy": []}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="tunneld-declared-") as tmpdir:
            tmp, procs = Path(tmpdir), bench.Children(Path(tmpdir))
            try:
                ports = [bench.free_port() for _ in range(args.mappings)]
                config = tmp / "server.toml"
                write_config(config, ports, target, 0)
                server = Server(args.binary, procs, tmp, config, "first")
                figures["first_start_ms"].append(server.ready_ms)
                server.stop()
                server = Server(args.binary, procs, tmp, config, "restart")
                figures["restart_ms"].append(server.ready_ms)
                watch = Watch(server, ports[0])
                figures["reload_same_ms"].append(server.reload())
                figures["watch_same"].append(watch.finish())
                write_config(config, ports, target, round_ + 1)
                watch = Watch(server, ports[0])
                figures["reload_policy_ms"].append(server.reload())
                figures["watch_policy"].append(watch.finish())
                server.stop()
            finally:
                procs.stop_all()
        bench.log(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in figures.items() if k.endswith("_ms")))
    bench.banner(f"{args.mappings} declared mappings, medians of {args.rounds} rounds")
    for key in ("first_start_ms", "restart_ms", "reload_same_ms", "reload_policy_ms"):
        bench.log(f"  {key:18} {statistics.median(figures[key]):8.0f} ms  (all: {', '.join(f'{v:.0f}' for v in figures[key])})")
    for key in ("watch_same", "watch_policy"):
        w = figures[key]
        bench.log(f"  {key:18} open connection survived {sum(x['survived'] for x in w)}/{len(w)}; "
                  f"longest echo {max(x['echo_max_ms'] or 0 for x in w):.1f} ms; "
                  f"longest /api/mapping/list {max(x['list_max_ms'] or 0 for x in w):.0f} ms")
    return 0 if all(x["survived"] for x in figures["watch_same"] + figures["watch_policy"]) else 1


if __name__ == "__main__":
    bench.entry(main)
