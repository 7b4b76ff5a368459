#!/usr/bin/env python3
"""Many-clients benchmark (issue 12): one tunneld server, 100 named clients with 10
tunneled mappings each, all on 127.0.0.1.

Two figures, each read against a baseline taken in the same run:

1. Server RSS per idle client session: the server's RSS with no client connected
   against the same server with every client connected and idle, divided by the
   number of clients. The 1,000 mappings exist in both readings (they are restored
   from the state dir before READY), so their cost is not counted as the sessions'.
   Measured with the default data-channel pool and with `client.pool_size = 0`
   (the session alone), with TLS (the default) and without. What the mappings and
   the client records themselves cost is reported on its own.
2. Tunneled connection setup rate (sequential connect, 1-byte echo, close) with all
   clients connected against only the clients whose mappings the load uses: the
   first client's mapping (all connected vs that client alone), and one mapping
   each of 10 clients in turn (all connected vs those 10 alone). Rounds alternate
   the order of the states; medians are compared.

bench/run.py runs this as its last section; alone:

    flock /tmp/tunneld-bench.lock python3 bench/clients.py [--quick]

Python 3 standard library only; it uses run.py's process and port helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

from run import (RESULTS_DIR, TARGET_DIR, BenchError, Children, Notify, build, entry, free_port, http_json, listening, log,
                 raise_fd_limit, run_loadgen, wait_until)

SESSION_KIB = 64.0
CONNRATE_RATIO = 0.9
SPREAD = 10


def status_kib(pid: int) -> dict:
    """VmRSS and its anonymous part (heap, stacks) in KiB. RssFile (the binary's
    pages touched so far) grows the first time a code path runs, e.g. the first
    TLS handshake, which is not memory a session holds; RssAnon shows that."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def heap_in_use(procs: Children, proc: subprocess.Popen) -> int | None:
    """Bytes the process has allocated and not freed (glibc's malloc_stats, called
    through gdb, prints them to the process's stderr, i.e. its log), or None
    without gdb. Unlike RSS it does not depend on what the allocator keeps cached
    or how fragmented its arenas are, so it is the steadier per-session figure."""
    if not shutil.which("gdb"):
        return None
    logfile = procs.logdir / f"{proc.name}.log"  # type: ignore[attr-defined]
    start = logfile.stat().st_size
    # gdb's exit status is not telling: it can complain while detaching (about
    # registers it could not write back) after the call went through.
    try:
        res = subprocess.run(["gdb", "-nx", "-batch", "-p", str(proc.pid), "-ex", "call (void)malloc_stats()"],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        log(f"  note: gdb did not return within 120 s; no heap figure for {proc.name}")  # type: ignore[attr-defined]
        return None
    procs.check_alive(proc)
    with open(logfile, errors="replace") as f:
        f.seek(start)
        text = f.read()
    total = text.rfind("Total (incl. mmap):")
    if total < 0:
        log(f"  note: gdb could not read the heap of {proc.name}: {res.stderr.strip()[-200:]}")  # type: ignore[attr-defined]
        return None
    for line in text[total:].splitlines():
        if line.startswith("in use bytes"):
            return int(line.split("=")[1])
    return None


def established_on(port: int) -> int:
    """ESTABLISHED TCP connections whose local end is 127.0.0.1:port, i.e. the
    server's ends of control and data channels."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return sum(1 for fields in (line.split() for line in f) if fields[1] == want and fields[3] == "01")


def settle(pid: int, quiet_kib: int = 64, timeout: float = 10.0) -> dict:
    """RSS once it stopped moving: two readings 0.5 s apart within `quiet_kib`
    (lazy allocation after a burst of handshakes, the allocator trimming)."""
    deadline = time.monotonic() + timeout
    last = status_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = status_kib(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) <= quiet_kib:
            return now
        last = now
    return last


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_quiet(procs: list[subprocess.Popen], children: Children, timeout: float = 30.0) -> None:
    """Until the processes together used at most 2 ticks (20 ms) of CPU in 0.5 s:
    clients that just connected are done with handshakes and start-up work, so a
    measurement that follows sees idle sessions, not their arrival."""
    deadline = time.monotonic() + timeout
    last = sum(cpu_ticks(p.pid) for p in procs)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        for p in procs:
            children.check_alive(p)
        now = sum(cpu_ticks(p.pid) for p in procs)
        if now - last <= 2:
            return
        last = now
    log(f"  note: the processes did not go quiet within {timeout:.0f} s; measuring anyway")


def api(base: str, path: str, body: dict | None = None) -> dict:
    try:
        reply = http_json(base + path, body)
    except urllib.error.HTTPError as e:
        raise BenchError(f"{path} {body}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    if not reply.get("success"):
        raise BenchError(f"{path} {body} failed: {reply}")
    return reply["data"]


class Bench:
    """A server whose state (clients, mappings) lives in one state dir, so every
    measurement starts a fresh server process that restores the same 1,000
    mappings; and the client processes connected to it."""

    def __init__(self, args, procs: Children, tmp: Path, env: dict):
        self.args, self.procs, self.tmp = args, procs, tmp
        self.env = {k: v for k, v in env.items() if not k.startswith("TUNNELD_")}
        self.env["RUST_LOG"] = "warn"
        self.state = tmp / "state"
        self.secret = "bench-" + os.urandom(8).hex()
        self.names = [f"c{i:03d}" for i in range(args.clients)]
        self.secrets: dict[str, str] = {}
        self.mappings: dict[str, list[int]] = {}
        self.server = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def config(self, tls: bool, pool: int | None) -> Path:
        tls_off = "" if tls else "tls = false\n"
        pool_line = "" if pool is None else f"pool_size = {pool}\n"
        path = self.tmp / f"tunneld-{'tls' if tls else 'plain'}-{pool}.toml"
        path.write_text(f'[server]\nbind_addr = "127.0.0.1"\n{tls_off}[client]\n{tls_off}{pool_line}')
        return path

    def start_server(self, label: str, tls: bool) -> None:
        self.starts += 1
        self.api = f"http://127.0.0.1:{free_port()}"
        self.tunnel_port = free_port()
        self.config_path = self.config(tls, None)
        notify = Notify(self.tmp / f"server-{self.starts}.notify")
        self.server = self.procs.spawn(f"clients-server-{label}", [
            str(self.args.tunneld), "server", "--config", str(self.config_path),
            "--api-listen", self.api.removeprefix("http://"), "--tunnel-listen", f"127.0.0.1:{self.tunnel_port}",
            "--state-dir", str(self.state), "--secret", self.secret,
        ], env={**self.env, "NOTIFY_SOCKET": str(notify.path)})
        notify.wait("READY=1", self.procs, self.server, timeout=60)
        self.pin = []
        if tls:
            out = subprocess.run([str(self.args.tunneld), "fingerprint", "--config", str(self.config_path),
                                  "--state-dir", str(self.state)], capture_output=True, text=True, env=self.env)
            if out.returncode != 0:
                raise BenchError(f"tunneld fingerprint failed: {out.stderr}")
            self.pin = ["--fingerprint", out.stdout.strip()]

    def stop_server(self) -> None:
        self.stop_clients(list(self.clients))
        self.procs.stop(self.server)

    def populate(self) -> dict:
        """Creates the clients and their mappings through the API; returns what the
        server's RSS did meanwhile."""
        before = settle(self.server.pid)
        for name in self.names:
            self.secrets[name] = api(self.api, "/api/client/create", {"name": name})["secret"]
        created = settle(self.server.pid)
        for name in self.names:
            self.mappings[name] = []
            for _ in range(self.args.mappings):
                port = free_port()
                m = api(self.api, "/api/mapping/create", {
                    "source_port": port, "target_host": "127.0.0.1", "target_port": self.echo_port,
                    "use_tunnel": True, "client": name})
                if m.get("status") != "waiting_for_tunnel" or m.get("client") != name:
                    raise BenchError(f"mapping {port} for {name}: unexpected {m}")
                self.mappings[name].append(port)
        mapped = settle(self.server.pid)
        n_maps = len(self.names) * self.args.mappings
        return {"rss_kib": {"empty": before, "clients_created": created, "mappings_created": mapped},
                "per_client_record_kib": (created["VmRSS"] - before["VmRSS"]) / len(self.names),
                "per_mapping_kib": (mapped["VmRSS"] - created["VmRSS"]) / n_maps,
                "per_mapping_anon_kib": (mapped["RssAnon"] - created["RssAnon"]) / n_maps}

    def check_restored(self) -> None:
        listed = api(self.api, "/api/mapping/list")["mappings"]
        bad = [m for m in listed if m.get("status") != "waiting_for_tunnel"]
        want = len(self.names) * self.args.mappings
        if len(listed) != want or bad:
            raise BenchError(f"restored {len(listed)} mappings (want {want}); not waiting for their client: {bad[:3]}")

    def start_clients(self, names: list[str], label: str, tls: bool, pool: int | None) -> None:
        """Starts the clients all at once and returns when the server lists every one
        of them as connected and their pools are open (counted on the tunnel port)."""
        config = self.config(tls, pool)
        for name in names:
            self.clients[name] = self.procs.spawn(f"clients/{label}-{name}-{self.starts}", [
                str(self.args.tunneld), "client", "--config", str(config), "--server", f"127.0.0.1:{self.tunnel_port}",
                "--name", name, "--secret", self.secrets[name], *self.pin], env=self.env)
        want = set(names)

        def connected() -> bool:
            for name in names:
                self.procs.check_alive(self.clients[name])
            listed = api(self.api, "/api/client/list")["clients"]
            return want <= {c["name"] for c in listed if c["connected"]}

        wait_until(f"{len(names)} clients to connect", connected, self.procs, self.server, timeout=120)
        pool_size = self.default_pool if pool is None else pool
        sessions = len([n for n in self.clients if self.clients[n].poll() is None])
        channels = sessions * (1 + pool_size)
        wait_until(f"{channels} control and pooled data channels", lambda: established_on(self.tunnel_port) >= channels,
                   self.procs, self.server, timeout=60)

    def stop_clients(self, names: list[str]) -> None:
        """Stops them all at once, then waits until the server lists none of them."""
        procs = [self.clients.pop(n) for n in names if n in self.clients]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            self.procs.stop(p)
        gone = set(names)
        if self.server.poll() is None:
            wait_until("the stopped clients to disconnect", lambda: not gone & {
                c["name"] for c in api(self.api, "/api/client/list")["clients"] if c["connected"]},
                self.procs, self.server, timeout=60)

    def connect_only(self, names: list[str], label: str, tls: bool) -> None:
        """Exactly `names` connected (default pool), and every process quiet again."""
        want = set(names)
        self.stop_clients([n for n in self.clients if n not in want])
        missing = [n for n in names if n not in self.clients]
        if missing:
            self.start_clients(missing, label, tls, None)
        wait_quiet([self.server, *self.clients.values()], self.procs)

    @property
    def default_pool(self) -> int:
        """client.pool_size as the binary defaults it, from `tunneld check-config`."""
        if not hasattr(self, "_default_pool"):
            out = subprocess.run([str(self.args.tunneld), "check-config", "--config", str(self.config(True, None)),
                                  "client"], capture_output=True, text=True,
                                 env={**self.env, "TUNNELD_CLIENT__SERVER": "127.0.0.1:1",
                                      "TUNNELD_CLIENT__SECRET": "x" * 16,
                                      "TUNNELD_CLIENT__SERVER_FINGERPRINT": "sha256:" + "0" * 64})
            lines = [line for line in out.stdout.splitlines() if line.strip().startswith("pool_size")]
            if out.returncode != 0 or not lines:
                raise BenchError(f"tunneld check-config client: {out.stderr or out.stdout}")
            self._default_pool = int(lines[0].split("=")[1])
        return self._default_pool


def measure_sessions(bench: Bench, label: str, tls: bool, pool: int | None) -> dict:
    """Fresh server (state restored), RSS with no session, then with every client
    connected and idle."""
    bench.start_server(label, tls)
    bench.check_restored()
    idle = settle(bench.server.pid)
    heap_idle = heap_in_use(bench.procs, bench.server)
    t0 = time.monotonic()
    bench.start_clients(bench.names, label, tls, pool)
    connect_s = time.monotonic() - t0
    wait_quiet([bench.server, *bench.clients.values()], bench.procs)
    full = settle(bench.server.pid)
    heap_full = heap_in_use(bench.procs, bench.server)
    n = len(bench.names)
    pool_size = bench.default_pool if pool is None else pool
    out = {"tls": tls, "pool_size": pool_size, "default_pool": pool is None, "clients": n,
           "connect_all_s": connect_s, "rss_kib": {"no_sessions": idle, "all_connected": full},
           "per_session_kib": (full["VmRSS"] - idle["VmRSS"]) / n,
           "per_session_anon_kib": (full["RssAnon"] - idle["RssAnon"]) / n,
           "heap_in_use_bytes": {"no_sessions": heap_idle, "all_connected": heap_full},
           "per_session_heap_kib": None if heap_idle is None or heap_full is None else (heap_full - heap_idle) / n / 1024}
    heap = "n/a (no gdb)" if out["per_session_heap_kib"] is None else f"{out['per_session_heap_kib']:5.1f} KiB"
    log(f"  {label:<13} {n} clients connected in {connect_s:4.1f} s; server RSS {idle['VmRSS'] / 1024:6.1f} -> "
        f"{full['VmRSS'] / 1024:6.1f} MiB: {out['per_session_kib']:5.1f} KiB per session "
        f"(anonymous {out['per_session_anon_kib']:5.1f} KiB; heap in use {heap}), pool_size {pool_size}")
    return out


def connrate(bench: Bench, ports: list[int]) -> dict:
    argv = ["connrate", "--count", str(bench.args.conns)]
    for port in ports:
        argv += ["--target", f"127.0.0.1:{port}"]
    return run_loadgen(bench.loadgen, argv, timeout=600)


def measure_connrate(bench: Bench, label: str, tls: bool) -> dict:
    """On the server and clients measure_sessions left running, rounds through
    three states: every client connected (the first client's mapping, then one
    mapping each of SPREAD clients), only those SPREAD clients connected (the same
    spread), only the first client (its mapping). Every ratio compares the same
    mappings; only the number of other, idle sessions differs. The order of the
    states reverses every round, so a drift in the machine's load hits both sides."""
    same = [bench.mappings[bench.names[0]][0]]
    step = max(len(bench.names) // SPREAD, 1)
    spread_names = bench.names[::step][:SPREAD]
    spread = [bench.mappings[name][i % bench.args.mappings] for i, name in enumerate(spread_names)]
    states = {"all": (bench.names, {"all_same": same, "all_spread": spread}),
              "spread": (spread_names, {"few_spread": spread}),
              "one": (bench.names[:1], {"one_same": same})}
    rounds: dict[str, list[dict]] = {key: [] for _, runs in states.values() for key in runs}
    for r in range(bench.args.rounds):
        order = ["all", "spread", "one"] if r % 2 == 0 else ["one", "spread", "all"]
        for state in order:
            names, runs = states[state]
            bench.connect_only(names, f"{label}-r{r}", tls)
            keys = list(runs) if r % 2 == 0 else list(reversed(runs))
            for key in keys:
                rounds[key].append(connrate(bench, runs[key]))
        log(f"  {label:<13} round {r + 1}: " + ", ".join(f"{k} {v[-1]['conns_per_s']:,.0f}" for k, v in rounds.items())
            + " conn/s")
    failures = sum(res["failures"] for runs in rounds.values() for res in runs)
    med = {k: statistics.median(res["conns_per_s"] for res in runs) for k, runs in rounds.items()}
    p50 = {k: statistics.median(res["p50_us"] for res in runs) for k, runs in rounds.items()}
    return {"tls": tls, "conns": bench.args.conns, "rounds": rounds, "failures": failures,
            "errors": sorted({e for runs in rounds.values() for res in runs for e in res["errors"]}),
            "spread_clients": spread_names, "spread_ports": spread, "median_conns_per_s": med, "median_p50_us": p50,
            "ratio_same": med["all_same"] / med["one_same"], "ratio_spread": med["all_spread"] / med["few_spread"]}


def summary(results: dict) -> list[str]:
    n = results["meta"]["clients"]
    m = results["meta"]["mappings_per_client"]
    lines = [f"many clients ({n} clients x {m} tunneled mappings; server RSS)",
             f"{'variant':<22}{'RSS no sessions':>16}{'all connected':>15}{'RSS/session':>13}{'heap/session':>14}",
             f"{'':<22}{'MiB':>16}{'MiB':>15}{'KiB':>13}{'KiB':>14}",
             "-" * 80]
    for s in results["sessions"]:
        label = f"{'TLS' if s['tls'] else 'plain'}, pool {s['pool_size']}" + (" (default)" if s["default_pool"] else "")
        heap = "n/a" if s["per_session_heap_kib"] is None else f"{s['per_session_heap_kib']:.1f}"
        lines.append(f"{label:<22}{s['rss_kib']['no_sessions']['VmRSS'] / 1024:>16.1f}"
                     f"{s['rss_kib']['all_connected']['VmRSS'] / 1024:>15.1f}{s['per_session_kib']:>13.1f}{heap:>14}")
    for kind, per in results.get("per_pooled_channel_kib", {}).items():
        heap = "n/a" if per["heap"] is None else f"{per['heap']:.1f} KiB"
        lines.append(f"  per pooled data channel ({kind}): RSS {per['rss']:.1f} KiB, heap {heap}")
    p = results["populate"]
    lines.append(f"  per mapping (waiting for its client): {p['per_mapping_kib']:.2f} KiB; "
                 f"per client record: {p['per_client_record_kib']:.2f} KiB")
    for c in results["connrate"]:
        med, p50 = c["median_conns_per_s"], c["median_p50_us"]
        k = len(c["spread_ports"])
        lines += ["", f"tunneled connection setup, {'TLS' if c['tls'] else 'plain'} "
                      f"({c['conns']} sequential connect+echo+close, median of {len(c['rounds']['one_same'])} rounds)",
                  f"{'':<34}{'1 client':>10}{f'{k} clients':>12}{f'{n} clients':>13}{'ratio':>8}"]
        for key, few, what in (("same", "one", "one client's mapping"), ("spread", "few", f"{k} clients' mappings")):
            col = f"{few}_{key}"
            cells = (f"{'':>10}{{:>12}}" if few == "few" else f"{{:>10}}{'':>12}")
            lines.append(f"{f'  {what}, conn/s':<34}" + cells.format(f"{med[col]:,.0f}")
                         + f"{med['all_' + key]:>13,.0f}{med['all_' + key] / med[col]:>7.2f}x")
            # The p50 latency shrugs off the bursts of load from elsewhere that
            # move conn/s (a mean over the run); its ratio is few / all.
            lines.append(f"{f'  {what}, p50 us':<34}" + cells.format(f"{p50[col]:,.0f}")
                         + f"{p50['all_' + key]:>13,.0f}{p50[col] / p50['all_' + key]:>7.2f}x")
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    return [f"  [{'PASS' if t['ok'] else 'FAIL'}] {t['name']}: {t['measured']}" for t in targets]


def evaluate(results: dict) -> list[dict]:
    targets = []
    for s in results["sessions"]:
        if s["pool_size"] == 0:
            targets.append({"name": f"server RSS per idle {'TLS' if s['tls'] else 'plain'} session (no pooled channels) "
                                    f"<= {SESSION_KIB:g} KiB",
                            "measured": f"{s['per_session_kib']:.1f} KiB", "ok": s["per_session_kib"] <= SESSION_KIB})
            if s["per_session_heap_kib"] is not None:
                targets.append({"name": f"server heap in use per idle {'TLS' if s['tls'] else 'plain'} session "
                                        f"(no pooled channels) <= {SESSION_KIB:g} KiB",
                                "measured": f"{s['per_session_heap_kib']:.1f} KiB",
                                "ok": s["per_session_heap_kib"] <= SESSION_KIB})
    n = results["meta"]["clients"]
    for c in results["connrate"]:
        kind = "TLS" if c["tls"] else "plain"
        k = len(c["spread_ports"])
        for key, what in (("ratio_same", "1 client's mapping: all connected vs it alone"),
                          ("ratio_spread", f"{k} clients' mappings: all connected vs those {k} alone")):
            targets.append({"name": f"{kind} conn/s with {n} clients >= {CONNRATE_RATIO}x ({what})",
                            "measured": f"{c[key]:.2f}x", "ok": c[key] >= CONNRATE_RATIO})
    return targets


def run(args, procs: Children, tmp: Path, results: dict) -> bool:
    echo_port = free_port()
    echo = procs.spawn("clients-echo", [str(args.loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
    wait_until("the echo target to listen", lambda: listening(echo_port), procs, echo)
    bench = Bench(args, procs, tmp, dict(os.environ))
    bench.echo_port, bench.loadgen = echo_port, args.loadgen
    (procs.logdir / "clients").mkdir(exist_ok=True)

    log(f"== creating {args.clients} clients and {args.clients * args.mappings} tunneled mappings")
    bench.start_server("populate", tls=True)
    pop = results["populate"] = bench.populate()
    log(f"  server RSS {pop['rss_kib']['empty']['VmRSS'] / 1024:.1f} MiB -> "
        f"{pop['rss_kib']['mappings_created']['VmRSS'] / 1024:.1f} MiB: "
        f"{pop['per_client_record_kib']:.2f} KiB per client record, {pop['per_mapping_kib']:.2f} KiB per mapping")
    bench.stop_server()

    log(f"\n== server RSS per idle session; tunneled connection setup with 1 client against {args.clients}")
    results["sessions"], results["connrate"] = [], []
    for tls in args.variants:
        kind = "tls" if tls else "plain"
        for pool in args.pools:
            label = f"{kind}-pool{'default' if pool is None else pool}"
            results["sessions"].append(measure_sessions(bench, label, tls, pool))
            if pool is None:
                results["connrate"].append(measure_connrate(bench, label, tls))
            bench.stop_server()
    results["per_pooled_channel_kib"] = {}
    for tls in args.variants:
        by_pool = {s["pool_size"]: s for s in results["sessions"] if s["tls"] == tls}
        if len(by_pool) == 2:
            (lo, a), (hi, b) = sorted(by_pool.items())
            heap = None if None in (a["per_session_heap_kib"], b["per_session_heap_kib"]) else \
                (b["per_session_heap_kib"] - a["per_session_heap_kib"]) / (hi - lo)
            results["per_pooled_channel_kib"]["TLS" if tls else "plain"] = {
                "rss": (b["per_session_kib"] - a["per_session_kib"]) / (hi - lo), "heap": heap}
    ok = True
    for c in results["connrate"]:
        if c["failures"]:
            ok = False
            log(f"  FAILED: {c['failures']} connections failed: {c['errors']}")
    return ok


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run for CI: TLS only, two rounds of 300 connections")
    ap.add_argument("--clients", type=int, default=100, help="named clients, one process each (default 100)")
    ap.add_argument("--mappings", type=int, default=10, help="tunneled mappings per client (default 10)")
    ap.add_argument("--conns", type=int, help="sequential connections per connrate run (default 2000, --quick 300)")
    ap.add_argument("--rounds", type=int, help="alternating rounds of the connrate comparison (default 5, --quick 2)")
    ap.add_argument("--tunneld", type=Path, default=TARGET_DIR / "release" / "tunneld", help="tunneld binary")
    ap.add_argument("--no-build", action="store_true", help="use the existing binaries, do not run cargo build")
    ap.add_argument("--rundir", type=Path, help="where logs go (default bench/results/clients-<timestamp>)")
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    args = ap.parse_args()
    args.conns = args.conns or (300 if args.quick else 2000)
    args.rounds = args.rounds or (2 if args.quick else 5)
    # TLS is the default and what the targets are about; plain shows what TLS costs.
    args.variants = (True,) if args.quick else (True, False)
    args.pools = (None, 0)
    args.loadgen = TARGET_DIR / "release" / "examples" / "loadgen"
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM (CI timeouts, run.py stopping) unwinds through the finally that stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    build(args.no_build)
    for binary in (args.tunneld, args.loadgen):
        if not binary.is_file():
            raise BenchError(f"{binary} does not exist (build it, or drop --no-build)")
    # Server: 1,000 listeners plus 1 + pool descriptors per client.
    raise_fd_limit(args.clients * (args.mappings + 16) + 256)
    rundir = args.rundir or RESULTS_DIR / ("clients-" + time.strftime("%Y%m%d-%H%M%S"))
    rundir.mkdir(parents=True, exist_ok=True)
    results: dict = {"meta": {"started": time.strftime("%Y%m%d-%H%M%S"), "quick": args.quick, "clients": args.clients,
                              "mappings_per_client": args.mappings, "conns": args.conns, "rounds": args.rounds,
                              "tunneld": str(args.tunneld), "cpus": os.cpu_count()}}
    log(f"tunneld many-clients benchmark, logs in {rundir}")
    procs = Children(rundir)
    # The state dir takes 1,100 SQLite writes with synchronous=FULL; on tmpfs they
    # cost nothing, and the disk is not what this measures.
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="tunneld-clients-", dir=shm) as tmpdir:
        try:
            ok = run(args, procs, Path(tmpdir), results)
        finally:
            procs.stop_all()
    results["targets"] = evaluate(results)
    # run.py prints the figures in its summary and the targets in its own list.
    results["summary"] = summary(results)
    log("\n" + "\n".join(results["summary"] + ["", "targets (issue 12):"] + target_lines(results["targets"])))
    for path in (rundir / "results.json", args.json):
        if path:
            path.write_text(json.dumps(results, indent=2) + "\n")
    if not ok:
        log("FAILED: tunneled connections failed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    entry(main)
