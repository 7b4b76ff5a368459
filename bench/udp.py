#!/usr/bin/env python3
"""UDP mappings (issue 22, "Numbers to hold"), in one run on 127.0.0.1, paths in
alternating rounds so load from elsewhere on the machine hits them alike:

  raw      visitor -> target                                       (loopback UDP's limit)
  direct   visitor -> tunneld UDP mapping -> target
  tunnel   visitor -> tunneld server -> tunnel -> tunneld client -> target
           (a UDP mapping with use_tunnel on a TLS tunnel: QUIC datagrams; skipped,
           loudly, where this build refuses one)
  framed   the same, the tunnel port's number over UDP taken by a socket that never
           answers, so the client falls back to datagrams framed over TLS
  rathole  visitor -> rathole server -> rathole client -> target   (its `type = "udp"` services)
  direct-base  with --baseline BIN: direct, through that other build (an A/B in the same rounds)

1. `iperf3 -u` at rising rates through each path: the rate received at the
   highest offered rate with < 0.1 % loss (a rate fails when two tries in a row
   lose 0.1 % or more), once with the system's socket buffers for iperf3 and once
   with `-w 4M` (so iperf3's own ends do not drop). Targets: tunnel >= 2x
   rathole's, direct >= 0.9x raw's.
2. 64-byte request/response to a UDP echo, one at a time: transactions/s, p50 and p99.
3. 10,000 UDP sessions (10,000 sockets on 127.0.0.2-41) on one mapping of freshly
   started daemons: RSS before and after, memory per session; direct and tunneled.
4. A 10 s spoofed-source flood (raw IPv4 datagrams from 100,000 random 127.x.y.z
   sources, as fast as Python sends them) on the mapping that holds the 10,000
   sessions of 3, i.e. at its session cap: RSS sampled throughout, `/health` and
   `/api/stats/traffic` timed every 100 ms, drops from
   `tunneld_mapping_dropped_datagrams_total{reason="session_limit"}` against what
   was sent and what the kernel dropped (`/proc/net/udp`), then a sample of the
   admitted sessions must still be answered.

    python3 bench/udp.py [--rounds 3] [--seconds 3] [--windows default,4M] [--quick] [--no-build]

Writes bench/results/udp-<timestamp>/ (results.json, summary.txt, every iperf3
JSON and every child's log). See bench/README.md ("UDP"). Python 3 standard
library, iperf3, and rathole (`--rathole`, default /work/tools/rathole or `rathole`
on PATH; its legs are skipped, loudly, without it). The flood needs CAP_NET_RAW
(root); without it the sources are 5,000 ordinary sockets, and the run says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, port and tunneld helpers)

from run import BenchError, log  # noqa: E402

PATHS = ("raw", "direct", "direct-base", "tunnel", "framed", "rathole")
LOSS_LIMIT = 0.1  # percent
RATES_MBIT = [25, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1000, 1300, 1600, 2000, 2500, 3200, 4000]
ECHO_PAYLOAD = 64
SESSIONS = 10_000
SESSIONS_PER_ADDRESS = 250
FLOOD_SOURCES = 100_000
# What tunneld may queue toward targets per mapping (MAPPING_QUEUED_BYTES in
# src/server/mappings/udp.rs): the part of the flood bound that is not sessions.
MAPPING_QUEUE_MIB = 4.0
API_BOUND_S = 1.0
SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------- helpers run as children


def serve_echo(port: int) -> None:
    """The UDP echo target, in a process of its own (no GIL shared with the visitor)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def flood(port: int, seconds: float) -> None:
    """Spoofed-source datagrams to 127.0.0.1:port for `seconds`; prints what it sent."""
    dst = socket.inet_aton("127.0.0.1")
    payload = b"\xff" * ECHO_PAYLOAD
    rng = random.Random(22)
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        raw = None
    if raw is not None:
        # 127.1-254.x.y: never the 127.0.x.y of the admitted sessions. IPv4 UDP
        # may go without a checksum; the kernel fills in the IP header's.
        packets, seen = [], set()
        while len(packets) < FLOOD_SOURCES:
            src = (rng.randrange(1, 255), rng.randrange(0, 256), rng.randrange(1, 255), rng.randrange(1024, 65536))
            if src in seen:
                continue
            seen.add(src)
            udp = struct.pack("!HHHH", src[3], port, 8 + len(payload), 0) + payload
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                             bytes((127, *src[:3])), dst)
            packets.append(ip + udp)
        send = lambda p: raw.sendto(p, ("127.0.0.1", 0))  # noqa: E731
        kind, sources = "raw IPv4, spoofed sources", len(packets)
    else:
        socks = []
        for i in range(5000):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.{1 + i // 250}.0.{1 + i % 250}", 0))
            socks.append(s)
        packets = socks
        send = lambda s: s.sendto(payload, ("127.0.0.1", port))  # noqa: E731
        kind, sources = "ordinary sockets (no CAP_NET_RAW)", len(socks)
    chunks = [packets[k:k + 1000] for k in range(0, len(packets), 1000)]
    sent, errors, i = 0, 0, 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for p in chunks[i % len(chunks)]:
            try:
                send(p)
                sent += 1
            except OSError:
                errors += 1
        i += 1
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": sent, "send_errors": errors, "seconds": elapsed, "pps": sent / elapsed,
                      "sources": sources, "kind": kind}), flush=True)


# --------------------------------------------------------------------------- sockets and /proc


def udp_socket_row(port: int) -> dict | None:
    """The unconnected UDP socket bound to `port`, from /proc/net/udp: its receive
    queue and the datagrams the kernel dropped on it (a full buffer)."""
    want = f":{port:04X}"
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1].endswith(want) and fields[2] == "00000000:0000":
                return {"rx_queue": int(fields[4].split(":")[1], 16), "drops": int(fields[-1])}
    return None


def iperf3_behind_each(binaries: dict, procs, tmp: Path) -> dict:
    """An iperf3 server on 127.0.0.1, and a direct UDP mapping to it in a fresh
    server of each of `binaries` (name -> path): {name: (port, Tunneld or
    None)}, with "raw" for iperf3's own port. For the probes that compare
    builds at fixed rates (udp_where.py, udp_cost.py)."""
    iport = bench.start_iperf3(procs)
    ports = {"raw": (iport, None)}
    for name, path in binaries.items():
        (tmp / name).mkdir()
        t = bench.Tunneld(Path(path), procs, tmp / name, dict(os.environ), name=name)
        port, _ = map_udp(t, iport, False, also_tcp=True)
        ports[name] = (port, t)
    return ports


def udp_bound(port: int) -> bool:
    return udp_socket_row(port) is not None


def metric(api: str, name: str, labels: dict) -> float:
    text = urllib.request.urlopen(api + "/metrics", timeout=10).read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def forwarded_or_queue_dropped(api: str, port: int) -> float:
    """Datagrams a mapping forwarded toward its target or dropped at a full queue:
    where flood datagrams from admitted sources would go (none, at the cap)."""
    return (metric(api, "tunneld_mapping_datagrams_total", {"port": port, "protocol": "udp", "direction": "sent"})
            + metric(api, "tunneld_mapping_dropped_datagrams_total", {"port": port, "protocol": "udp", "reason": "queue_full"}))


def timed_get(url: str) -> tuple[float, dict | None]:
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except OSError:
        body = None
    return time.perf_counter() - start, body


# --------------------------------------------------------------------------- rathole


class Rathole:
    """A rathole server and client on loopback with the given services, plain TCP
    transport (rathole's default, its fastest)."""

    def __init__(self, binary: str, procs: bench.Children, tmp: Path, services: list[tuple[str, str, int, int]]):
        self.procs = procs
        control = bench.free_port()
        token = "bench-" + os.urandom(8).hex()
        server = f'[server]\nbind_addr = "127.0.0.1:{control}"\ndefault_token = "{token}"\n'
        client = f'[client]\nremote_addr = "127.0.0.1:{control}"\ndefault_token = "{token}"\n'
        for name, kind, port, target in services:
            server += f'\n[server.services.{name}]\ntype = "{kind}"\nbind_addr = "127.0.0.1:{port}"\n'
            client += f'\n[client.services.{name}]\ntype = "{kind}"\nlocal_addr = "127.0.0.1:{target}"\n'
        (tmp / "rathole-server.toml").write_text(server)
        (tmp / "rathole-client.toml").write_text(client)
        for name in ("rathole-server.toml", "rathole-client.toml"):
            shutil.copy(tmp / name, procs.logdir / name)
        env = {**os.environ, "RUST_LOG": "warn"}
        self.server = procs.spawn("rathole-server", [binary, "--server", str(tmp / "rathole-server.toml")], env=env)
        bench.wait_until("rathole's server to listen", lambda: bench.listening(control), procs, self.server)
        self.client = procs.spawn("rathole-client", [binary, "--client", str(tmp / "rathole-client.toml")], env=env)
        for _, kind, port, _ in services:
            ready = (lambda port=port: udp_bound(port)) if kind == "udp" else (lambda port=port: bench.listening(port))
            bench.wait_until(f"rathole's {kind} service on {port}", ready, procs, self.server)


# --------------------------------------------------------------------------- tunneld


def map_udp(t: bench.Tunneld, target_port: int, use_tunnel: bool, also_tcp: bool = False) -> tuple[int | None, str]:
    """A UDP mapping (and a TCP one on the same port, for iperf3's control
    connection) to `target_port`; (port, "") or (None, why it was refused)."""
    port = bench.free_port()
    for protocol in (("tcp", "udp") if also_tcp else ("udp",)):
        body = {"source_port": port, "protocol": protocol, "target_host": "127.0.0.1", "target_port": target_port,
                "use_tunnel": use_tunnel}
        req = urllib.request.Request(t.api + "/api/mapping/create", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                reply = json.load(r)
        except urllib.error.HTTPError as e:
            reply = json.loads(e.read() or b"{}")
        if not reply.get("success"):
            return None, reply.get("message", str(reply))
    def active() -> bool:
        mappings = bench.http_json(t.api + "/api/stats/traffic")["data"]["mappings"]
        return all(m["status"] == "active" for m in mappings if m["port"] == port)

    bench.wait_until(f"mapping {port} to be active", active, t.procs, t.server)
    return port, ""


def traffic_entry(api: str, port: int) -> dict:
    data = bench.http_json(api + "/api/stats/traffic")["data"]
    return next(m for m in data["mappings"] if m["port"] == port and m.get("protocol") == "udp")


def tunnel_transport(api: str) -> str:
    """What the server says carries the tunneled datagrams, if it says."""
    clients = bench.http_json(api + "/api/client/list")["data"]["clients"]
    for c in clients:
        for key in ("udp_transport", "datagram_transport", "transport"):
            if key in c:
                return str(c[key])
    return "not reported"


# --------------------------------------------------------------------------- measurements


def echo_run(port: int, n: int) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    payload = b"x" * ECHO_PAYLOAD
    for _ in range(100):  # warm up, and open the session
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            sock.recv(2048)
        except socket.timeout:
            pass
    times, lost = [], 0
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            sock.recv(2048)
        except socket.timeout:
            lost += 1
            continue
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    sock.close()
    return {"tps": len(times) / elapsed, "lat_us": [t * 1e6 for t in times], "lost": lost}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def iperf_udp(port: int, mbit: int, seconds: float, length: int, window: str | None, save: Path) -> dict:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", f"{mbit}M", "-l", str(length),
            "-t", str(seconds), "-J", *(["-w", window] if window else [])]
    for _ in range(5):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        save.write_text(res.stdout)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"error": res.stderr.strip() or f"exit {res.returncode}"}
        if "busy" not in out.get("error", ""):
            break
        time.sleep(1.0)
    if "error" in out:
        # A forwarder that lost iperf3's own control exchange: a failed rate.
        return {"loss": 100.0, "error": out["error"], "mbit": 0.0}
    s = out["end"]["sum"]
    packets = max(int(s.get("packets", 0)), 1)
    return {"loss": 100.0 * int(s.get("lost_packets", 0)) / packets, "mbit": s["bits_per_second"] / 1e6,
            "packets": packets}


def ladder_round(paths: dict, round_no: int, args, window: str | None, iperf_dir: Path) -> dict:
    """One round: rising offered rates, every path still clean at each rate, in an
    order that rotates with the rate and the round. A path's figure is the rate
    its receiver got at the highest offered rate it carried with < 0.1 % loss
    (below the offered rate when iperf3's sender could not keep up)."""
    alive = list(paths)
    best = {p: 0 for p in paths}
    achieved = {p: 0.0 for p in paths}
    tried: dict = {p: [] for p in paths}
    for i, rate in enumerate(RATES_MBIT):
        if not alive:
            break
        shift = (round_no + i) % len(alive)
        for path in alive[shift:] + alive[:shift]:
            tries = []
            for attempt in range(2):
                r = iperf_udp(paths[path], rate, args.seconds, args.datagram, window,
                              iperf_dir / f"w{window or 'default'}-r{round_no}-{path}-{rate}M-{attempt}.json")
                tries.append({"loss": round(r["loss"], 3), "mbit": round(r["mbit"], 1)})
                if r["loss"] < LOSS_LIMIT:
                    break
                if "error" in r:
                    # iperf3's own handshake failed, often on the tail of a
                    # lossy run's datagrams: let that tail drain before the retry.
                    time.sleep(1.0)
            tried[path].append((rate, tries))
            if tries[-1]["loss"] < LOSS_LIMIT:
                best[path] = rate
                achieved[path] = min(tries[-1]["mbit"], float(rate))
            else:
                alive.remove(path)
        log(f"    {rate:>5} Mbit/s: " + "  ".join(
            f"{p} {[t['loss'] for t in tried[p][-1][1]]}" for p in paths if tried[p] and tried[p][-1][0] == rate))
    return {"best_offered": best, "achieved": achieved, "tried": tried}


def open_sessions(api: str, port: int, n: int, first: int) -> tuple[list[socket.socket], float]:
    """n sockets on 127.0.<first..>.x, each answered once through the mapping; a
    window of 128 outstanding so the mapping socket's receive buffer never
    overflows (what it dropped is sent again)."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.{first + i // (SESSIONS_PER_ADDRESS * 250)}.{2 + (i // SESSIONS_PER_ADDRESS) % 250}", 0))
        s.setblocking(False)
        socks.append(s)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, i)
    payload = b"s" * ECHO_PAYLOAD
    start = time.monotonic()
    waiting, answered, sent_at = list(range(n - 1, -1, -1)), set(), {}
    while len(answered) < n:
        if time.monotonic() - start > 120:
            raise BenchError(f"only {len(answered)} of {n} sessions answered within 120 s")
        now = time.monotonic()
        for i in [i for i, t in sent_at.items() if now - t > 0.5]:
            del sent_at[i]
            waiting.append(i)
        while waiting and len(sent_at) < 128:
            i = waiting.pop()
            socks[i].sendto(payload, ("127.0.0.1", port))
            sent_at[i] = time.monotonic()
        for key, _ in sel.select(0.05):
            try:
                key.fileobj.recv(2048)
            except BlockingIOError:
                continue
            answered.add(key.data)
            sent_at.pop(key.data, None)
    sel.close()
    return socks, time.monotonic() - start


def answered_sample(socks: list[socket.socket], port: int, sample: int) -> int:
    """How many of `sample` sockets spread over `socks` get an echo (3 tries each)."""
    chosen = socks[:: max(1, len(socks) // sample)][:sample]
    ok = 0
    for s in chosen:
        s.setblocking(True)
        s.settimeout(0.3)
        for _ in range(3):
            s.sendto(b"after the flood", ("127.0.0.1", port))
            try:
                while s.recv(2048) != b"after the flood":
                    pass
                ok += 1
                break
            except socket.timeout:
                continue
    return ok


def sessions_phase(t: bench.Tunneld, port: int, n: int, first: int) -> tuple[dict, list[socket.socket]]:
    time.sleep(1.0)
    before = {"server": bench.rss_kib(t.server.pid)["VmRSS"], "client": bench.rss_kib(t.client.pid)["VmRSS"]}
    socks, took = open_sessions(t.api, port, n, first)
    bench.wait_until(f"{n} sessions on {port}", lambda: traffic_entry(t.api, port)["udp"]["sessions"] >= n,
                     t.procs, t.server, timeout=60)
    time.sleep(1.0)
    after = {"server": bench.rss_kib(t.server.pid)["VmRSS"], "client": bench.rss_kib(t.client.pid)["VmRSS"]}
    out = {"sessions": traffic_entry(t.api, port)["udp"]["sessions"], "seconds_to_open": round(took, 2)}
    for role in ("server", "client"):
        out[role] = {"rss_before_kib": before[role], "rss_after_kib": after[role],
                     "per_session_kib": round((after[role] - before[role]) / n, 3)}
    return out, socks


def flood_phase(t: bench.Tunneld, port: int, seconds: float, admitted: list[socket.socket]) -> dict:
    labels = {"port": port, "protocol": "udp", "reason": "session_limit"}
    dropped_before = metric(t.api, "tunneld_mapping_dropped_datagrams_total", labels)
    others_before = forwarded_or_queue_dropped(t.api, port)
    kernel_before = udp_socket_row(port)["drops"]
    rss_before = bench.rss_kib(t.server.pid)["VmRSS"]
    client_before = bench.rss_kib(t.client.pid)["VmRSS"]
    flooder = t.procs.spawn(f"flood-{port}", [sys.executable, str(SCRIPT), "--flood", str(port), str(seconds)],
                            stdout=subprocess.PIPE)
    samples, api_times, api_failures, sessions_seen = [], [], 0, []
    while flooder.poll() is None:
        tick = time.monotonic()
        samples.append((bench.rss_kib(t.server.pid)["VmRSS"], bench.rss_kib(t.client.pid)["VmRSS"]))
        for path in ("/health", "/api/stats/traffic"):
            took, body = timed_get(t.api + path)
            api_times.append(took)
            if body is None:
                api_failures += 1
            elif path == "/api/stats/traffic":
                entry = next((m for m in body["data"]["mappings"] if m["port"] == port and m.get("protocol") == "udp"), None)
                if entry:
                    sessions_seen.append(entry["udp"]["sessions"])
        time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    line = flooder.stdout.readline()
    if not line:
        raise BenchError(f"the flooder said nothing; its log:\n{t.procs.log_tail(flooder)}")
    sent = json.loads(line)
    # Until the daemon has read what the kernel kept for it.
    deadline = time.monotonic() + 20
    while True:
        dropped = metric(t.api, "tunneld_mapping_dropped_datagrams_total", labels) - dropped_before
        others = forwarded_or_queue_dropped(t.api, port) - others_before
        kernel = udp_socket_row(port)["drops"] - kernel_before
        if dropped + others + kernel >= sent["sent"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    rss_after = bench.rss_kib(t.server.pid)["VmRSS"]
    sample = min(200, len(admitted))
    answered = answered_sample(admitted, port, sample)
    rss_max = max(s[0] for s in samples + [(rss_after, 0)])
    return {
        "flood": sent,
        "session_limit_drops": int(dropped), "kernel_drops": int(kernel), "forwarded_or_queue_full": int(others),
        "accounted_exactly": int(dropped) + int(kernel) + int(others) == sent["sent"],
        "server_rss_kib": {"before": rss_before, "max_during": rss_max, "after": rss_after},
        "client_rss_kib": {"before": client_before, "max_during": max(s[1] for s in samples) if samples else None},
        "rss_growth_mib": round((rss_max - rss_before) / 1024, 2),
        "api_calls": len(api_times), "api_failures": api_failures,
        "api_p50_ms": round(percentile(api_times, 0.5) * 1e3, 1), "api_p99_ms": round(percentile(api_times, 0.99) * 1e3, 1),
        "api_max_ms": round(max(api_times) * 1e3, 1) if api_times else None,
        "sessions_max": max(sessions_seen) if sessions_seen else None,
        "admitted_answered": f"{answered}/{sample}",
    }


# --------------------------------------------------------------------------- the run


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See bench/README.md (\"UDP\") for what each figure means.")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the echo and iperf3 parts (default 3)")
    ap.add_argument("--seconds", type=float, default=3.0, help="each iperf3 run (default 3)")
    ap.add_argument("--datagram", type=int, default=1200, help="iperf3's datagram payload bytes (default 1200)")
    ap.add_argument("--windows", default="default,4M",
                    help="iperf3 -w settings to run the ladders with, in turn: 'default' (the system's socket buffers) "
                         "and/or sizes such as 4M, which keep iperf3's own ends from dropping so that what is lost is "
                         "the forwarder's (default: default,4M)")
    ap.add_argument("--transactions", type=int, default=3000, help="echo transactions per path and round (default 3000)")
    ap.add_argument("--sessions", type=int, default=SESSIONS, help=f"sessions for the memory figure (default {SESSIONS})")
    ap.add_argument("--flood-seconds", type=float, default=10.0, help="the flood's length (default 10)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s iperf3, 500 transactions, 1000 sessions, 3 s flood")
    ap.add_argument("--tunneld", type=Path, default=bench.TARGET_DIR / "release" / "tunneld")
    ap.add_argument("--rathole", default=None, help="rathole binary (default /work/tools/rathole, else on PATH)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a second tunneld binary whose direct mapping runs as path 'direct-base' in the same "
                         "alternating rounds (an A/B in one run: ratio direct/direct-base)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the sessions and flood phases")
    ap.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--flood", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.windows = [None if w == "default" else w for w in args.windows.split(",")]
    if args.quick:
        args.rounds, args.seconds, args.transactions, args.sessions, args.flood_seconds = 1, 1.0, 500, 1000, 3.0
    return args


def main() -> int:
    args = parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    if args.flood:
        flood(int(args.flood[0]), float(args.flood[1]))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if not shutil.which("iperf3"):
        raise BenchError("iperf3 not found (apt-get install iperf3)")
    rathole = args.rathole or ("/work/tools/rathole" if os.path.exists("/work/tools/rathole") else shutil.which("rathole"))
    if not args.no_build:
        log("$ cargo build --release --bin tunneld")
        if subprocess.run(["cargo", "build", "--release", "--bin", "tunneld"], cwd=bench.REPO).returncode != 0:
            raise BenchError("cargo build --release failed")
    if not args.tunneld.is_file():
        raise BenchError(f"{args.tunneld} does not exist (build it, or drop --no-build)")
    bench.raise_fd_limit(args.sessions + 1024)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rundir = bench.RESULTS_DIR / f"udp-{stamp}"
    (rundir / "iperf").mkdir(parents=True)
    results: dict = {"meta": {
        "started": stamp, "git": bench.first_line(["git", "describe", "--always", "--dirty"]),
        "kernel": os.uname().release, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "iperf3": bench.first_line(["iperf3", "--version"]),
        "rathole": bench.first_line([rathole, "--version"]) if rathole else "not found",
        "args": {k: str(v) for k, v in vars(args).items()}}}
    log(f"run directory: {rundir}")
    if not rathole:
        bench.banner("rathole SKIPPED: not found (--rathole PATH); no ratio to it")

    procs = bench.Children(rundir)
    try:
        with tempfile.TemporaryDirectory(prefix="tunneld-bench-udp-") as tmpdir:
            ok = run(args, rathole, procs, Path(tmpdir), rundir, results)
    finally:
        procs.stop_all()
        results["meta"]["loadavg_end"] = os.getloadavg()
        (rundir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        lines = summary(results)
        (rundir / "summary.txt").write_text("\n".join(lines) + "\n")
        log("\n" + "\n".join(lines))
        log(f"\nwrote {rundir}")
    return 0 if ok else 1


def run(args, rathole: str | None, procs: bench.Children, tmp: Path, rundir: Path, results: dict) -> bool:
    env = dict(os.environ)
    echo_port = bench.free_port()
    echo = procs.spawn("udp-echo", [sys.executable, str(SCRIPT), "--serve-echo", str(echo_port)])
    bench.wait_until("the UDP echo", lambda: udp_bound(echo_port), procs, echo)
    iperf_port = bench.start_iperf3(procs)

    (tmp / "speed").mkdir()
    tunneld = bench.Tunneld(args.tunneld, procs, tmp / "speed", env, name="speed")
    echo_ports = {"raw": echo_port}
    iperf_ports = {"raw": iperf_port}
    skipped: dict = {}
    speed_daemons = [tunneld]
    echo_ports["direct"], _ = map_udp(tunneld, echo_port, False)
    iperf_ports["direct"], _ = map_udp(tunneld, iperf_port, False, also_tcp=True)
    if args.baseline:
        (tmp / "base").mkdir()
        base = bench.Tunneld(args.baseline, procs, tmp / "base", env, name="base")
        speed_daemons.append(base)
        echo_ports["direct-base"], _ = map_udp(base, echo_port, False)
        iperf_ports["direct-base"], _ = map_udp(base, iperf_port, False, also_tcp=True)
    port, why = map_udp(tunneld, echo_port, True)
    if port is None:
        skipped["tunnel"] = skipped["framed"] = why
        bench.banner(f"tunneled UDP SKIPPED: this tunneld refuses a UDP mapping with use_tunnel ({why})")
    else:
        echo_ports["tunnel"] = port
        iperf_ports["tunnel"], _ = map_udp(tunneld, iperf_port, True, also_tcp=True)
        # The fallback: a TLS tunnel whose port number over UDP is taken by a
        # socket that never answers, so the client's QUIC attempt times out and
        # it frames datagrams over a TLS data channel instead.
        blocked_port = bench.free_port()
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.1", blocked_port))
        (tmp / "framed").mkdir()
        framed = bench.Tunneld(args.tunneld, procs, tmp / "framed", env, name="framed", tunnel_port=blocked_port)
        speed_daemons.append(framed)
        echo_ports["framed"], _ = map_udp(framed, echo_port, True)
        iperf_ports["framed"], _ = map_udp(framed, iperf_port, True, also_tcp=True)
        for path, daemon in (("tunnel", tunneld), ("framed", framed)):
            echo_run(echo_ports[path], 1)  # the first session asks for the datagram link
            bench.wait_until(f"the {path} client's datagram link",
                             lambda d=daemon: tunnel_transport(d.api) not in ("None", "not reported"),
                             procs, daemon.server, timeout=30)
            results["meta"][f"{path}_transport"] = tunnel_transport(daemon.api)
            log(f"{path}: the tunnel carries datagrams as {results['meta'][f'{path}_transport']}")
    if rathole:
        r_echo, r_iperf = bench.free_port(), bench.free_port()
        Rathole(rathole, procs, tmp, [("echo", "udp", r_echo, echo_port), ("iperf_udp", "udp", r_iperf, iperf_port),
                                      ("iperf_tcp", "tcp", r_iperf, iperf_port)])
        echo_ports["rathole"], iperf_ports["rathole"] = r_echo, r_iperf
    else:
        skipped["rathole"] = "not found"
    results["skipped"] = skipped
    paths = [p for p in PATHS if p in echo_ports]

    # 1. 64-byte echo, alternating rounds.
    log(f"\n64-byte UDP echo, {args.transactions} transactions per path and round, {args.rounds} rounds:")
    echo: dict = {p: {"tps": [], "lat_us": [], "lost": 0} for p in paths}
    for r in range(args.rounds):
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        for p in order:
            res = echo_run(echo_ports[p], args.transactions)
            echo[p]["tps"].append(res["tps"])
            echo[p]["lat_us"].extend(res["lat_us"])
            echo[p]["lost"] += res["lost"]
        log(f"  round {r + 1}: " + "  ".join(f"{p} {echo[p]['tps'][-1]:,.0f}/s" for p in paths))
    results["echo"] = {p: {"tps_median": statistics.median(v["tps"]), "tps_rounds": [round(x) for x in v["tps"]],
                           "p50_us": percentile(v["lat_us"], 0.5), "p99_us": percentile(v["lat_us"], 0.99),
                           "lost": v["lost"]} for p, v in echo.items()}

    # 2. iperf3 -u ladders, alternating rounds, for each socket-buffer setting.
    results["iperf3"] = {}
    for window in args.windows:
        label = window or "default"
        log(f"\niperf3 -u, {args.datagram}-byte datagrams, {args.seconds:g} s per rate, iperf3's socket buffers: "
            f"{label}; highest rate with < {LOSS_LIMIT} % loss:")
        ladders = []
        for r in range(args.rounds):
            log(f"  round {r + 1}:")
            ladders.append(ladder_round({p: iperf_ports[p] for p in paths}, r, args, window, rundir / "iperf"))
            log("  round {}: best {}".format(r + 1, "  ".join(f"{p} {ladders[-1]['achieved'][p]:.0f}" for p in paths)))
        best = {p: statistics.median(lad["achieved"][p] for lad in ladders) for p in paths}
        ratios = {}
        for name, a, b, target in (("direct/raw", "direct", "raw", 0.9), ("direct-base/raw", "direct-base", "raw", 0.9),
                                   ("direct/direct-base", "direct", "direct-base", None),
                                   ("tunnel/rathole", "tunnel", "rathole", 2.0),
                                   ("framed/rathole", "framed", "rathole", None)):
            if a in best and b in best and best[b]:
                per_round = [lad["achieved"][a] / lad["achieved"][b] if lad["achieved"][b] else None for lad in ladders]
                ratios[name] = {"ratio_of_medians": best[a] / best[b], "per_round": per_round, "target": target,
                                "met": None if target is None else best[a] / best[b] >= target}
            else:
                ratios[name] = {"ratio_of_medians": None, "target": target, "met": None}
        results["iperf3"][label] = {"datagram": args.datagram, "loss_limit_percent": LOSS_LIMIT,
                                    "median_best_mbit": best, "ratios": ratios, "rounds": ladders}
    results["tunneld_drops_speed"] = {p: traffic_entry(d.api, iperf_ports[p])["udp"]["dropped"]
                                      for p, d in (("direct", tunneld), ("tunnel", tunneld),
                                                   ("framed", speed_daemons[-1] if "framed" in iperf_ports else None),
                                                   ("direct-base", speed_daemons[1] if args.baseline else None))
                                      if p in iperf_ports}
    for daemon in speed_daemons:
        for proc in (daemon.client, daemon.server):
            procs.stop(proc)

    if args.skip_memory:
        return True
    # 3 and 4. Fresh daemons: sessions, then the flood at the cap.
    (tmp / "memory").mkdir()
    # Sessions must outlive the whole phase (opening them, the flood, the check
    # after it), so the idle timeout is longer than the default minute; the cap
    # is the number of sessions opened (the default, 10,000, unless --sessions),
    # so the flood comes when the mapping is full.
    mem = bench.Tunneld(args.tunneld, procs, tmp / "memory", env, name="memory",
                        server_extra=f"udp_session_idle_secs = 600\nmax_udp_sessions_per_mapping = {args.sessions}\n")
    results["sessions"], results["flood"] = {}, {}
    legs = [("direct", False, 0)] + ([("tunnel", True, 1)] if "tunnel" in echo_ports else [])
    for leg, use_tunnel, first in legs:
        port, why = map_udp(mem, echo_port, use_tunnel)
        if port is None:
            raise BenchError(f"the {leg} UDP mapping for the sessions was refused: {why}")
        log(f"\n{args.sessions:,} UDP sessions, {leg}:")
        res, socks = sessions_phase(mem, port, args.sessions, first)
        results["sessions"][leg] = res
        log(f"  {res}")
        log(f"\n{args.flood_seconds:g} s spoofed-source flood on the {leg} mapping at its cap:")
        res = flood_phase(mem, port, args.flood_seconds, socks)
        results["flood"][leg] = res
        log(f"  {res}")
        for s in socks:
            s.close()
    return True


def summary(results: dict) -> list[str]:
    lines = [f"bench/udp.py run {results['meta']['started']} ({results['meta']['git']}), "
             f"load average {results['meta']['loadavg_start'][0]:.2f} at start, "
             f"{results['meta'].get('loadavg_end', [0])[0]:.2f} at end, {results['meta']['cpus']} CPUs"]
    for path, why in results.get("skipped", {}).items():
        lines.append(f"SKIPPED {path}: {why}")
    for path in ("tunnel", "framed"):
        if f"{path}_transport" in results["meta"]:
            lines.append(f"{path}: the tunnel carried datagrams as {results['meta'][f'{path}_transport']}")
    echo = results.get("echo", {})
    if echo:
        raw = echo.get("raw", {}).get("tps_median")
        lines += ["", f"64-byte echo        {'tx/s (median)':>14} {'x raw':>7} {'p50 us':>8} {'p99 us':>8} {'lost':>5}"]
        for p, v in echo.items():
            lines.append(f"  {p:<17} {v['tps_median']:>14,.0f} {v['tps_median'] / raw:>6.2f}x {v['p50_us']:>8.0f} "
                         f"{v['p99_us']:>8.0f} {v['lost']:>5}")
    for label, ip in results.get("iperf3", {}).items():
        lines += ["", f"iperf3 -u, {ip['datagram']} B, iperf3's socket buffers {label}: received Mbit/s at the highest "
                      f"rate with < {ip['loss_limit_percent']} % loss (median of rounds; rounds)"]
        for p, v in ip["median_best_mbit"].items():
            lines.append(f"  {p:<17} {v:>8.0f}   {[round(lad['achieved'][p]) for lad in ip['rounds']]}")
        for name, r in ip["ratios"].items():
            target = "" if r["target"] is None else f"; target >= {r['target']}x: {'PASS' if r['met'] else 'FAIL'}"
            if r["ratio_of_medians"] is None:
                lines.append(f"  {name:<17} n/a{target}")
            else:
                rounds = ", ".join("n/a" if x is None else f"{x:.2f}" for x in r["per_round"])
                lines.append(f"  {name:<17} {r['ratio_of_medians']:.2f}x (rounds {rounds}{target})")
    for leg, s in results.get("sessions", {}).items():
        lines += ["", f"{s['sessions']:,} sessions, {leg}: server RSS {s['server']['rss_before_kib'] / 1024:.1f} -> "
                      f"{s['server']['rss_after_kib'] / 1024:.1f} MiB = {s['server']['per_session_kib']:.2f} KiB/session; "
                      f"client {s['client']['rss_before_kib'] / 1024:.1f} -> {s['client']['rss_after_kib'] / 1024:.1f} MiB = "
                      f"{s['client']['per_session_kib']:.2f} KiB/session"]
    for leg, f in results.get("flood", {}).items():
        fl = f["flood"]
        rss = f["server_rss_kib"]
        bound_ok = f["rss_growth_mib"] <= MAPPING_QUEUE_MIB + 1.0
        lines += [
            "", f"flood on the {leg} mapping at its cap ({fl['kind']}, {fl['sources']:,} sources): "
                f"{fl['sent']:,} datagrams in {fl['seconds']:.1f} s ({fl['pps']:,.0f}/s)",
            f"  session_limit drops {f['session_limit_drops']:,} + kernel drops {f['kernel_drops']:,} + forwarded "
            f"{f['forwarded_or_queue_full']:,} = {f['session_limit_drops'] + f['kernel_drops'] + f['forwarded_or_queue_full']:,}"
            f" ({'exact' if f['accounted_exactly'] else 'NOT exact'}); "
            f"sessions max {f['sessions_max']}",
            f"  server RSS {rss['before'] / 1024:.1f} MiB before, {rss['max_during'] / 1024:.1f} max, "
            f"{rss['after'] / 1024:.1f} after: +{f['rss_growth_mib']} MiB (bound: the {MAPPING_QUEUE_MIB:g} MiB queue + 1: "
            f"{'PASS' if bound_ok else 'FAIL'})",
            f"  API during the flood: {f['api_calls']} calls, {f['api_failures']} failed, p50 {f['api_p50_ms']} ms, "
            f"p99 {f['api_p99_ms']} ms, max {f['api_max_ms']} ms (bound {API_BOUND_S * 1e3:.0f} ms: "
            f"{'PASS' if f['api_failures'] == 0 and (f['api_max_ms'] or 0) < API_BOUND_S * 1e3 else 'FAIL'}); "
            f"admitted sessions answered after it: {f['admitted_answered']}",
        ]
    return lines


if __name__ == "__main__":
    bench.entry(main)
