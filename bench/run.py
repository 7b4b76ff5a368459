#!/usr/bin/env python3
"""Benchmark harness for tunneld (issue 6): one run, all on 127.0.0.1.

Measures four paths side by side so every figure can be read as a ratio taken on
the same machine at the same moment (absolute numbers on a shared 2-core box are
noise; ratios much less so):

  raw      client -> target                      (the physical limit of loopback)
  haproxy  client -> HAProxy (TCP mode) -> target (the reference user-space forwarder)
  direct   client -> tunneld direct mapping -> target
  tunnel   client -> tunneld server -> data channel (TLS, the default) -> tunneld client -> target
  plain    the same with server.tls = client.tls = false
  rathole, rathole-tls
           the same through rathole (TCP transport; rustls transport), when a
           rathole binary is given (--rathole): the peer reverse tunnel

Figures: iperf3 throughput (1 stream, 8 streams, 1 stream reversed), sequential
connection setup rate and latency, 1000 concurrent verified echoes, and the RSS
of the tunneld server and client idle and with 1000 tunneled connections open.
Last, bench/clients.py (issue 12): 100 named clients with 10 mappings each.
See bench/README.md for how to run it and what each figure means.

Python 3 standard library only, so it runs anywhere the tools do.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
RESULTS_DIR = REPO / "bench" / "results"

PATHS = ("raw", "haproxy", "direct", "tunnel", "plain", "rathole", "rathole-tls")
FORWARDERS = ("haproxy", "direct", "tunnel", "plain", "rathole", "rathole-tls")
RATHOLE_PATHS = ("rathole", "rathole-tls")
TUNNELD_PATHS = ("direct", "tunnel", "plain")

# key -> (label, unit), in report order. Every figure is measured for every path.
FIGURES = {
    "tput_1": ("throughput, 1 stream", "Gbit/s"),
    "tput_8": ("throughput, 8 streams", "Gbit/s"),
    "tput_1r": ("throughput, 1 stream -R", "Gbit/s"),
    "conn_rate": ("connection setup rate", "conn/s"),
    "conn_p50": ("connect+echo p50", "us"),
    "conn_p99": ("connect+echo p99", "us"),
    "conc_elapsed": ("concurrent echo elapsed", "s"),
    "conc_failures": ("concurrent echo failures", ""),
}

# iperf3 variants: figure key -> extra iperf3 arguments.
IPERF_RUNS = {"tput_1": [], "tput_8": ["-P", "8"], "tput_1r": ["-R"]}

# Targets of issues 6 and 11: (figure, path, minimum ratio, baseline path), all
# measured in the same run, plus the absolute memory and failure bounds. "tunnel"
# is the default (TLS) tunnel, "plain" the same with TLS off.
RATIO_TARGETS = (
    ("tput_1", "direct", 1.0, "haproxy"),
    ("tput_8", "direct", 1.0, "haproxy"),
    ("tput_1r", "direct", 1.0, "haproxy"),
    ("tput_1", "tunnel", 0.6, "haproxy"),
    ("tput_8", "tunnel", 0.6, "haproxy"),
    ("tput_1r", "tunnel", 0.6, "haproxy"),
    ("conn_rate", "direct", 1.0, "haproxy"),
    ("tput_1", "plain", 1.2, "haproxy"),
    ("conn_rate", "plain", 0.9, "haproxy"),
    ("conn_rate", "tunnel", 0.9, "plain"),
    ("tput_8", "tunnel", 0.6, "plain"),
    # Issue 24: TLS costs at most 15 % of the plain tunnel's 1-stream throughput,
    # and each tunnel sets up connections 1.2x as fast as rathole's same transport.
    ("tput_1", "tunnel", 0.85, "plain"),
    ("conn_rate", "plain", 1.2, "rathole"),
    ("conn_rate", "tunnel", 1.2, "rathole-tls"),
)
IDLE_SERVER_RSS_MIB = 12.0
PER_CONN_KIB = 64.0

PR_SET_PDEATHSIG = 1


def log(msg: str = "") -> None:
    print(msg, flush=True)


def banner(msg: str) -> None:
    line = "*" * (len(msg) + 8)
    log(f"\n{line}\n*** {msg} ***\n{line}\n")


class BenchError(Exception):
    """A failure that makes the run meaningless (a daemon died, a tool is missing)."""


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    # Runs in the child before exec: if the harness is SIGKILLed, its finally blocks
    # never run, so let the kernel take the children down with it instead of leaving
    # daemons holding ports on a shared machine.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Children:
    """Every process the harness starts, each logging to its own file in the run dir."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str], *, env: dict | None = None, stdin=subprocess.DEVNULL,
              stdout=None) -> subprocess.Popen:
        logfile = open(self.logdir / f"{name}.log", "wb")
        # A session of its own: Ctrl-C reaches only the harness, which then stops the
        # children in order instead of them all racing to shut down at once.
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout or logfile, stderr=logfile, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        logfile.close()
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log_tail(self, proc: subprocess.Popen, lines: int = 20) -> str:
        path = self.logdir / f"{proc.name}.log"  # type: ignore[attr-defined]
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:]) or "(empty log)"

    def check_alive(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.returncode}; its log ends:\n"  # type: ignore[attr-defined]
                             f"{self.log_tail(proc)}")

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        # Reverse start order: forwarders go before the targets they forward to.
        for proc in reversed(self.procs):
            self.stop(proc)


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on every address, picked *below* the ephemeral range. Everything
    else on a shared machine (other test suites) gets its ports by binding port 0,
    i.e. from the ephemeral range, and may keep reconnecting to a port it released;
    if that port became one of our mappings, its retries would show up as stray
    connections in our figures. Below the range, nobody else's port 0 lands."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    while True:
        port = random.randrange(10000, max(ephemeral_low, 20000))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def listening(port: int) -> bool:
    """True when something LISTENs on 127.0.0.1:port. Read from /proc rather than
    probed with a connect, which HAProxy would forward to iperf3 as a bogus test."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(fields[1] == want and fields[3] == "0A" for fields in (line.split() for line in f))


def wait_until(what: str, cond, procs: Children, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        procs.check_alive(proc)
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}; log:\n{procs.log_tail(proc)}")
        time.sleep(0.05)


class Notify:
    """A NOTIFY_SOCKET for one daemon: readiness from the daemon itself, not sleeps."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)

    def wait(self, needle: str, procs: Children, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if needle in self.sock.recv(4096).decode(errors="replace"):
                    return
            except socket.timeout:
                procs.check_alive(proc)
        raise BenchError(f"{proc.name} sent no {needle!r} within {timeout:.0f} s; log:\n"  # type: ignore[attr-defined]
                         f"{procs.log_tail(proc)}")


def rss_kib(pid: int) -> dict:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_ns_by_thread(pid: int) -> dict[str, int]:
    """CPU time of each live thread of a process, in nanoseconds, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def schedstat_sums(pid: int) -> tuple[int, int]:
    """(CPU ns, switch-ins) summed over a process's live threads, from
    schedstat: CPU time by scheduler accounting (finer than /proc/PID/stat's
    10 ms ticks, which a round of a few thousand connections would turn into a
    few percent of error), and the times its threads were switched in
    (voluntary and involuntary together: a thread sleeping in `epoll_wait` and
    woken for each step of an exchange counts once a wake)."""
    cpu = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while being read
        cpu += int(fields[0])
        switches += int(fields[2])
    return cpu, switches


def cpu_ns(pid: int) -> int:
    """CPU time a process's live threads have used, in nanoseconds."""
    return schedstat_sums(pid)[0]


def switch_ins(pid: int) -> int:
    """Times a process's live threads were switched in."""
    return schedstat_sums(pid)[1]


def listen_overflows() -> int:
    """TcpExtListenOverflows: SYNs dropped because an accept queue was full. Each one
    costs its connection a 1 s retransmit, so it explains a slow concurrency figure."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split()))["ListenOverflows"])
    return 0


# --------------------------------------------------------------------------- tunneld


def http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


class Tunneld:
    """A tunneld server with a connected client, both isolated from any config on
    the host (their own config file, no TUNNELD_* variables) so the run measures
    defaults — except that mappings listen on loopback only, as everything here does,
    rather than exposing an echo service on every interface. `server_extra` and
    `extra_config` are lines added to the config file's `[server]` and `[client]`
    tables; `tunnel_port` is the tunnel's port (default: a free one)."""

    def __init__(self, binary: Path, procs: Children, tmp: Path, fd_env: dict, tls: bool = True, name: str | None = None,
                 extra_config: str = "", server_extra: str = "", tunnel_port: int | None = None):
        self.procs = procs
        self.api = f"http://127.0.0.1:{free_port()}"
        tunnel_port = tunnel_port or free_port()
        secret = "bench-" + os.urandom(8).hex()
        name = name or ("tls" if tls else "plain")
        tmp = tmp / name
        tmp.mkdir()
        config = tmp / "tunneld.toml"
        tls_off = "" if tls else "tls = false\n"
        config.write_text(f'[server]\nbind_addr = "127.0.0.1"\n{tls_off}{server_extra}[client]\n{tls_off}{extra_config}')
        # No configuration from the caller's environment, but the benchmarks'
        # own switch (`bench/ab.py --binary copy=PATH@TUNNELD_FORCE_COPY=1`).
        env = {k: v for k, v in fd_env.items() if not k.startswith("TUNNELD_") or k == "TUNNELD_FORCE_COPY"}
        env["RUST_LOG"] = "warn"

        notify = Notify(tmp / "server.notify")
        state = tmp / "state"
        self.server = procs.spawn(f"tunneld-server-{name}", [
            str(binary), "server", "--config", str(config), "--api-listen", self.api.removeprefix("http://"),
            "--tunnel-listen", f"127.0.0.1:{tunnel_port}", "--state-dir", str(state), "--secret", secret,
        ], env={**env, "NOTIFY_SOCKET": str(notify.path)})
        notify.wait("READY=1", procs, self.server)

        pin = []
        if tls:
            # As an operator would: read the generated certificate's fingerprint.
            out = subprocess.run([str(binary), "fingerprint", "--config", str(config), "--state-dir", str(state)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise BenchError(f"tunneld fingerprint failed: {out.stderr}")
            pin = ["--fingerprint", out.stdout.strip()]
        notify = Notify(tmp / "client.notify")
        self.client = procs.spawn(f"tunneld-client-{name}", [
            str(binary), "client", "--config", str(config), "--server", f"127.0.0.1:{tunnel_port}",
            "--secret", secret, "--metrics-listen", f"127.0.0.1:{free_port()}", *pin,
        ], env={**env, "NOTIFY_SOCKET": str(notify.path)})
        notify.wait("STATUS=connected", procs, self.client)
        wait_until("the server to see the tunnel", lambda: http_json(self.api + "/health").get("tunnel_connected"),
                   procs, self.server)

    def map(self, target_port: int, use_tunnel: bool) -> int:
        port = free_port()
        reply = http_json(self.api + "/api/mapping/create", {
            "source_port": port, "target_host": "127.0.0.1", "target_port": target_port, "use_tunnel": use_tunnel})
        if not reply.get("success") or reply["data"].get("status") != "active":
            raise BenchError(f"creating mapping {port} -> {target_port} failed: {reply}")
        return port

    def traffic(self) -> dict[int, dict]:
        return {m["port"]: m for m in http_json(self.api + "/api/stats/traffic")["data"]["mappings"]}

    def wait_drained(self, ports: list[int], timeout: float = 30.0) -> None:
        """Waits until the given mappings have no open connections, so one phase's
        closing connections neither linger into the next nor miss the counters."""
        try:
            wait_until("connections to close", lambda: all(self.traffic()[p]["active_connections"] == 0 for p in ports),
                       self.procs, self.server, timeout)
        except BenchError as e:
            still = {p: {k: m[k] for k in ("active_connections", "connections_total")}
                     for p, m in self.traffic().items() if p in ports}
            raise BenchError(f"{e}\nmappings still open: {still}") from None


# --------------------------------------------------------------------------- HAProxy


HAPROXY_CFG = """\
# Generated by bench/run.py: plain TCP mode with HAProxy's defaults otherwise
# (threads = CPUs, no splice), i.e. what a user gets from the Debian package.
global
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def start_haproxy(procs: Children, tmp: Path, targets: dict[str, int], concurrent: int) -> dict[str, int]:
    fronts = {name: free_port() for name in targets}
    # HAProxy refuses to start when maxconn needs more descriptors (two per
    # connection) than the limit allows, so ask for what the run needs, with headroom.
    cfg = HAPROXY_CFG.format(maxconn=2 * concurrent + 100) + "".join(
        f"\nlisten {name}\n    bind 127.0.0.1:{fronts[name]}\n    server target 127.0.0.1:{port}\n"
        for name, port in targets.items())
    path = tmp / "haproxy.cfg"
    path.write_text(cfg)
    shutil.copy(path, procs.logdir / "haproxy.cfg")
    proc = procs.spawn("haproxy", ["haproxy", "-db", "-f", str(path)])
    for port in fronts.values():
        wait_until("haproxy to listen", lambda port=port: listening(port), procs, proc)
    return fronts


# --------------------------------------------------------------------------- rathole


def start_rathole(binary: Path, procs: Children, tmp: Path, targets: dict[str, int], tls: bool) -> dict[str, int]:
    """A rathole server and client pair forwarding to `targets` (name -> port): the
    peer reverse tunnel, with its TCP transport or its rustls one. rathole wants a
    CA-signed certificate (its client trusts a root, not a pin) and a PKCS#12 file,
    so the run makes both with openssl: ECDSA P-256, as tunneld's generated one."""
    name = "rathole-tls" if tls else "rathole"
    tmp = tmp / name
    tmp.mkdir()
    control = free_port()
    token = "bench-" + os.urandom(8).hex()
    fronts = {service: free_port() for service in targets}
    server_transport = client_transport = 'type = "tcp"\n'
    if tls:
        make_rathole_identity(tmp)
        server_transport = f'type = "tls"\n[server.transport.tls]\npkcs12 = "{tmp / "identity.pfx"}"\npkcs12_password = "bench"\n'
        client_transport = f'type = "tls"\n[client.transport.tls]\ntrusted_root = "{tmp / "ca.pem"}"\nhostname = "localhost"\n'
    server = tmp / "server.toml"
    server.write_text(f'[server]\nbind_addr = "127.0.0.1:{control}"\ndefault_token = "{token}"\n'
                      f"[server.transport]\n{server_transport}"
                      + "".join(f'[server.services.{s}]\nbind_addr = "127.0.0.1:{fronts[s]}"\n' for s in targets))
    client = tmp / "client.toml"
    client.write_text(f'[client]\nremote_addr = "127.0.0.1:{control}"\ndefault_token = "{token}"\n'
                      f"[client.transport]\n{client_transport}"
                      + "".join(f'[client.services.{s}]\nlocal_addr = "127.0.0.1:{port}"\n' for s, port in targets.items()))
    for path in (server, client):
        shutil.copy(path, procs.logdir / f"{name}-{path.name}")
    # As tunneld: warnings only, no line per connection.
    env = {**os.environ, "RUST_LOG": "warn"}
    server_proc = procs.spawn(f"{name}-server", [str(binary), "--server", str(server)], env=env)
    wait_until(f"{name} server to listen", lambda: listening(control), procs, server_proc)
    client_proc = procs.spawn(f"{name}-client", [str(binary), "--client", str(client)], env=env)
    # The server opens a service's port once the client's control channel for it is up.
    for port in fronts.values():
        wait_until(f"{name} to open its service port", lambda port=port: listening(port), procs, client_proc)
    return fronts


def make_rathole_identity(tmp: Path) -> None:
    def openssl(*argv: str) -> None:
        res = subprocess.run(["openssl", *argv], cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"openssl {' '.join(argv)} failed: {res.stderr.strip()}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-subj", "/CN=tunneld bench CA", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2")
    openssl("req", "-new", *ec, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (tmp / "ext.cnf").write_text("basicConstraints = CA:FALSE\nsubjectAltName = DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    # The PKCS#12 algorithms rathole's parser (the p12 crate) reads.
    openssl("pkcs12", "-export", "-out", "identity.pfx", "-inkey", "server.key", "-in", "server.pem",
            "-passout", "pass:bench", "-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1")


# --------------------------------------------------------------------------- measurements


def start_iperf3(procs: Children) -> int:
    """An iperf3 server on a free loopback port, listening: its port. It gives up
    on a silent peer after 10 s instead of staying busy forever, so one broken
    path cannot wedge the runs through the other paths."""
    port = free_port()
    proc = procs.spawn("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port), "--rcv-timeout", "10000"])
    wait_until("iperf3 -s to listen", lambda: listening(port), procs, proc)
    return port


def strace_calls(text: str) -> tuple[dict[str, int], int]:
    """What `strace -c` wrote: ({syscall: calls}, total calls)."""
    calls = {m.group(2): int(m.group(1))
             for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", text, re.M)}
    return calls, calls.pop("total", sum(calls.values()))


def run_iperf(port: int, seconds: int, extra: list[str], save: Path) -> dict:
    # seconds 0: the run ends by what `extra` says (-n BYTES).
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), *(["-t", str(seconds)] if seconds else []), "-J", *extra]
    for attempt in range(5):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=(seconds or 60) + 60)
        save.write_text(res.stdout)
        try:
            end = json.loads(res.stdout)
        except json.JSONDecodeError:
            end = {"error": res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}"}
        # The client of the previous run can exit before `iperf3 -s` has reset for
        # the next test; it then refuses with "busy", and a moment later accepts.
        if "busy" not in end.get("error", ""):
            break
        time.sleep(1.0)
    if "error" in end or res.returncode != 0:
        raise BenchError(f"iperf3 {' '.join(extra)} on port {port} failed: {end.get('error')}")
    sent, received = end["end"]["sum_sent"], end["end"]["sum_received"]
    # The receiver's rate is what actually arrived through the forwarder.
    return {"gbps": received["bits_per_second"] / 1e9, "sent_bytes": sent["bytes"], "received_bytes": received["bytes"]}


def run_loadgen(loadgen: Path, args: list[str], timeout: float) -> dict:
    res = subprocess.run([str(loadgen), *args, "--json"], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise BenchError(f"loadgen {' '.join(args)} failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


def hold_and_measure(loadgen: Path, procs: Children, tunneld: Tunneld, port: int, conns: int) -> dict:
    """RSS of server and client idle, then with `conns` tunneled connections open."""
    # Let the client's data-channel pool and any lazy start-up allocation settle.
    time.sleep(1.0)
    idle = {"server": rss_kib(tunneld.server.pid), "client": rss_kib(tunneld.client.pid)}
    hold = procs.spawn("loadgen-hold", [str(loadgen), "hold", "--target", f"127.0.0.1:{port}", "--conns", str(conns)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = hold.stdout.readline()
        procs.check_alive(hold)
        ready = json.loads(line)
        time.sleep(1.0)
        held = {"server": rss_kib(tunneld.server.pid), "client": rss_kib(tunneld.client.pid)}
        active = tunneld.traffic()[port]["active_connections"]
    finally:
        hold.stdin.close()
        procs.stop(hold)
    tunneld.wait_drained([port])
    out = {"hold": ready, "server_active_connections": active}
    for role in ("server", "client"):
        out[role] = {
            "idle_rss_kib": idle[role]["VmRSS"],
            "held_rss_kib": held[role]["VmRSS"],
            "per_conn_kib": (held[role]["VmRSS"] - idle[role]["VmRSS"]) / max(ready["open"], 1),
        }
    return out


# --------------------------------------------------------------------------- reporting


def ratio(value, base) -> float | None:
    return value / base if value is not None and base else None


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit in ("conn/s", "us") or isinstance(value, int):
        return f"{value:,.0f}"
    return f"{value:.3f}" if unit == "s" else f"{value:.2f}"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def print_figure(figures: dict, key: str, path: str) -> None:
    """One measurement as soon as it is known, with its ratios to raw and HAProxy
    (which are always measured first)."""
    label, unit = FIGURES[key]
    values = figures[key]
    value = values.get(path)
    parts = [f"  {label:<26} {path:<8} {fmt(value, unit):>9} {unit:<7}"]
    if path != "raw":
        parts.append(f"{fmt_ratio(ratio(value, values.get('raw'))):>7} raw")
    if path in TUNNELD_PATHS:
        parts.append(f"{fmt_ratio(ratio(value, values.get('haproxy'))):>7} haproxy")
    if path == "tunnel":
        parts.append(f"{fmt_ratio(ratio(value, values.get('plain'))):>7} plain")
    peer = {"plain": "rathole", "tunnel": "rathole-tls"}.get(path)
    if peer and values.get(peer):
        parts.append(f"{fmt_ratio(ratio(value, values.get(peer))):>7} {peer}")
    log(" ".join(parts))


def summary(results: dict) -> list[str]:
    figs = results["figures"]
    paths = results["meta"].get("paths", PATHS)
    head = f"{'figure':<27}{'unit':<7}" + "".join(f"{p:>12}" for p in paths)
    pairs = [("direct", "haproxy"), ("tunnel", "haproxy"), ("plain", "haproxy"), ("tunnel", "plain")]
    if "rathole" in paths:
        pairs += [("plain", "rathole"), ("tunnel", "rathole-tls")]
    names = {"direct": "dir", "haproxy": "hap", "tunnel": "tun", "plain": "pla", "rathole": "rh", "rathole-tls": "rhtls"}
    head += "".join(f"{names[a] + '/' + names[b]:>11}" for a, b in pairs)
    lines = [head, "-" * len(head)]
    for key, (label, unit) in FIGURES.items():
        v = figs.get(key, {})
        if not v:
            continue
        row = f"{label:<27}{unit:<7}" + "".join(f"{fmt(v.get(p), unit):>12}" for p in paths)
        row += "".join(f"{fmt_ratio(ratio(v.get(a), v.get(b))):>11}" for a, b in pairs)
        lines.append(row)
    lines.append("(ratios are value / baseline; for us, s and failures lower is better; rh = rathole, tun = the TLS tunnel)")
    if results["meta"].get("rounds", 1) > 1:
        lines.append(f"(throughput and conn/s: median of {results['meta']['rounds']} rounds, path order alternating)")

    mem = results.get("memory")
    if mem:
        n = mem["hold"]["open"]
        lines += ["", f"{'tunneld memory (TLS tunnel)':<42}{'server':>10}{'client':>10}", "-" * 62]
        for label, key, scale in (("idle RSS (MiB)", "idle_rss_kib", 1024),
                                  (f"RSS with {n} tunneled conns (MiB)", "held_rss_kib", 1024),
                                  ("added per tunneled conn (KiB)", "per_conn_kib", 1)):
            lines.append(f"{label:<42}" + "".join(f"{mem[r][key] / scale:>10.2f}" for r in ("server", "client")))
        after = results.get("memory_after_load", {})
        if after:
            lines.append(f"{'RSS after the whole run (MiB)':<42}"
                         + "".join(f"{after[r]['VmRSS'] / 1024:>10.2f}" for r in ("server", "client")))
            lines.append(f"{'peak RSS during the run (MiB)':<42}"
                         + "".join(f"{after[r]['VmHWM'] / 1024:>10.2f}" for r in ("server", "client")))

    counters = results.get("counters")
    if counters:
        lines += ["", "tunneld counters vs iperf3 bytes (throughput phase):"]
        for path, c in counters.items():
            for direction in ("sent", "received"):
                d = c[direction]
                lines.append(f"  {path:<7}{direction:<9} counter {d['counter']:>15,}  iperf3 received {d['iperf_received']:>15,}"
                             f"  sent {d['iperf_sent']:>15,}  {'OK' if d['ok'] else 'MISMATCH'}")

    clients = results.get("clients")
    if clients:
        lines += [""] + clients["summary"]

    lines += ["", "targets (issues 6, 11 and 12):"]
    for t in results["targets"]:
        lines.append(f"  [{'PASS' if t['ok'] else 'FAIL' if t['ok'] is False else 'n/a '}] {t['name']}: {t['measured']}")
    return lines


def evaluate_targets(results: dict) -> list[dict]:
    figs = results["figures"]
    targets = []
    for key, path, want, base in RATIO_TARGETS:
        r = ratio(figs[key].get(path), figs[key].get(base))
        targets.append({"name": f"{path} {FIGURES[key][0]} >= {want}x {base}", "measured": fmt_ratio(r),
                        "ok": None if r is None else r >= want})
    mem = results["memory"]
    idle_mib = mem["server"]["idle_rss_kib"] / 1024
    targets.append({"name": f"idle server RSS <= {IDLE_SERVER_RSS_MIB:g} MiB", "measured": f"{idle_mib:.2f} MiB",
                    "ok": idle_mib <= IDLE_SERVER_RSS_MIB})
    for role in ("server", "client"):
        per = mem[role]["per_conn_kib"]
        targets.append({"name": f"{role} memory per tunneled conn <= {PER_CONN_KIB:g} KiB", "measured": f"{per:.1f} KiB",
                        "ok": per <= PER_CONN_KIB})
    for path in TUNNELD_PATHS:
        conc = results.get("concurrent", {}).get(path)
        if conc is None:
            continue
        targets.append({"name": f"{conc['conns']} concurrent {path} conns, zero failures",
                        "measured": f"{conc['failures']} failures", "ok": conc["failures"] == 0})
    return targets + (results.get("clients") or {}).get("targets", [])


def check_counters(before: dict, after: dict, iperf: dict, ports: dict) -> dict:
    """The mapping counters must account for what iperf3 moved: at least what the
    receiver got (it cannot read bytes tunneld never wrote) and at most what the
    sender wrote, plus a little for iperf3's own control connection."""
    slack = 1 << 20
    out = {}
    for path in TUNNELD_PATHS:
        port = ports[path]
        out[path] = {}
        # Forward runs move data visitor -> target ("sent"); -R runs the other way.
        for direction, keys in (("sent", ("tput_1", "tput_8")), ("received", ("tput_1r",))):
            counter = after[port][f"bytes_{direction}"] - before[port][f"bytes_{direction}"]
            sent = sum(iperf[k][path]["sent_bytes"] for k in keys)
            received = sum(iperf[k][path]["received_bytes"] for k in keys)
            out[path][direction] = {"counter": counter, "iperf_sent": sent, "iperf_received": received,
                                    "ok": received <= counter <= sent + slack}
    return out


# --------------------------------------------------------------------------- main


def build(skip: bool) -> None:
    if skip:
        return
    for argv in (["cargo", "build", "--release"], ["cargo", "build", "--release", "--example", "loadgen"]):
        log(f"$ {' '.join(argv)}")
        if subprocess.run(argv, cwd=REPO).returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed")


def raise_fd_limit(need: int) -> int:
    """Children inherit the soft limit, so raising it here is what lets tunneld (which
    holds two sockets per tunneled connection) and HAProxy take a thousand."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < need:
        log(f"warning: RLIMIT_NOFILE is {soft}, below the ~{need} this run needs; expect failures")
    return soft


def first_line(argv: list[str]) -> str:
    """What a tool says about its version, recorded so runs can be compared later."""
    try:
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    except FileNotFoundError:
        return "not installed"
    return (res.stdout or res.stderr).strip().split("\n")[0]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See bench/README.md for what each figure means.")
    ap.add_argument("--quick", action="store_true",
                    help="short smoke run for CI: 2 s iperf3, 200 sequential and 100 concurrent connections")
    ap.add_argument("--seconds", type=int, help="iperf3 duration per run (default 10, --quick 2)")
    ap.add_argument("--conns", type=int, help="sequential connections per path (default 2000, --quick 200)")
    ap.add_argument("--concurrent", type=int,
                    help="simultaneous connections, for the concurrency and memory figures (default 1000, --quick 100)")
    ap.add_argument("--bytes", type=int, default=16384, help="bytes each concurrent connection echoes (default 16384)")
    ap.add_argument("--tunneld", type=Path, default=TARGET_DIR / "release" / "tunneld", help="tunneld binary")
    ap.add_argument("--no-build", action="store_true", help="use the existing binaries, do not run cargo build")
    ap.add_argument("--skip-haproxy", action="store_true", help="run without HAProxy (no ratios to it)")
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    ap.add_argument("--rathole", type=Path, default=shutil.which("rathole"),
                    help="rathole binary (built with --features rustls) for the rathole paths (default: rathole on PATH; "
                         "without one those paths are skipped)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure throughput and conn/s this many times, alternating the path order, and report "
                         "medians (default 1)")
    ap.add_argument("--only", default="",
                    help="comma-separated phases to run out of throughput,connrate,concurrency,clients "
                         "(default all; memory always runs)")
    args = ap.parse_args()
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.conns = args.conns or (200 if args.quick else 2000)
    args.concurrent = args.concurrent or (100 if args.quick else 1000)
    args.phases = set(filter(None, args.only.split(","))) or {"throughput", "connrate", "concurrency", "clients"}
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM (CI timeouts, `kill`) must unwind through the finally that stops the
    # children, just like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    if not shutil.which("iperf3"):
        raise BenchError("iperf3 not found (apt-get install iperf3)")
    if not args.skip_haproxy and not shutil.which("haproxy"):
        raise BenchError("haproxy not found (apt-get install haproxy), or pass --skip-haproxy")
    if args.skip_haproxy:
        banner("HAProxy SKIPPED: no ratios to the reference forwarder, its targets not checked")
    paths = [p for p in PATHS if p != "haproxy" or not args.skip_haproxy]
    if not args.rathole or not Path(args.rathole).is_file():
        banner("rathole SKIPPED: no binary (--rathole PATH); no ratios to it")
        paths = [p for p in paths if p not in RATHOLE_PATHS]

    build(args.no_build)
    loadgen = TARGET_DIR / "release" / "examples" / "loadgen"
    for binary in (args.tunneld, loadgen):
        if not binary.is_file():
            raise BenchError(f"{binary} does not exist (build it, or drop --no-build)")
    fd_limit = raise_fd_limit(4 * args.concurrent + 256)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rundir = RESULTS_DIR / stamp
    rundir.mkdir(parents=True)
    results: dict = {
        "meta": {"started": stamp, "git": first_line(["git", "describe", "--always", "--dirty"]),
                 "kernel": os.uname().release, "iperf3": first_line(["iperf3", "--version"]),
                 "haproxy": first_line(["haproxy", "-v"]) if not args.skip_haproxy else "skipped",
                 "cpus": os.cpu_count(), "quick": args.quick,
                 "seconds": args.seconds, "conns": args.conns, "concurrent": args.concurrent, "bytes": args.bytes,
                 "fd_limit": fd_limit, "tunneld": str(args.tunneld), "paths": paths, "rounds": args.rounds,
                 "rathole": first_line([str(args.rathole), "--version"]) if "rathole" in paths else "skipped"},
        "figures": {key: {} for key in FIGURES},
    }
    log(f"tunneld benchmark {results['meta']['git']}, logs in {rundir.relative_to(REPO)}")

    procs = Children(rundir)
    ok = True
    with tempfile.TemporaryDirectory(prefix="tunneld-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            ok = run(args, paths, procs, tmp, loadgen, rundir, results)
        finally:
            procs.stop_all()
    results["clients"], clients_rc = run_clients(args, rundir) if "clients" in args.phases else (None, 0)
    ok &= clients_rc == 0

    results["ratios"] = {key: {path: {"raw": ratio(v.get(path), v.get("raw")), "haproxy": ratio(v.get(path), v.get("haproxy"))}
                               for path in FORWARDERS} for key, v in results["figures"].items()}
    results["targets"] = evaluate_targets(results)
    lines = summary(results)
    log("\n" + "\n".join(lines))
    if args.skip_haproxy:
        banner("HAProxy SKIPPED: no ratios to the reference forwarder, its targets not checked")

    for path in (rundir / "results.json", args.json):
        if path:
            path.write_text(json.dumps(results, indent=2) + "\n")
    (rundir / "summary.txt").write_text("\n".join(lines) + "\n")
    log(f"\nresults: {(rundir / 'results.json').relative_to(REPO)}" + (f" and {args.json}" if args.json else ""))
    if clients_rc not in (0, 1):
        log(f"FAILED: the many-clients section could not run (bench/clients.py exited with {clients_rc})")
        return 2
    if not ok:
        log("FAILED: connections failed or the counters did not match (see above)")
    return 0 if ok else 1


def run_clients(args, rundir: Path) -> tuple[dict | None, int]:
    """Issue 12's section: bench/clients.py (100 client processes and a server of
    its own), in its own process, after every daemon above has stopped."""
    out = rundir / "clients.json"
    argv = [sys.executable, str(REPO / "bench" / "clients.py"), "--no-build", "--tunneld", str(args.tunneld),
            "--rundir", str(rundir / "clients"), "--json", str(out)] + (["--quick"] if args.quick else [])
    log("\n== many clients: bench/clients.py" + (" --quick" if args.quick else ""))
    rc = subprocess.run(argv, preexec_fn=_die_with_parent).returncode
    return (json.loads(out.read_text()) if out.exists() else None), rc


def alternating(paths: list[str], rounds: int):
    """(round, path) for `rounds` rounds, every other round in reverse order, so a
    burst of load from elsewhere on a shared machine does not always hit the same
    path, nor one path always run right after another."""
    for round_no in range(rounds):
        for path in (paths if round_no % 2 == 0 else list(reversed(paths))):
            yield round_no, path


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def rounds_note(rounds: int) -> str:
    return f", {rounds} rounds in alternating order (medians)" if rounds > 1 else ""


def run(args, paths: list[str], procs: Children, tmp: Path, loadgen: Path, rundir: Path, results: dict) -> bool:
    """Starts everything, measures every figure; returns False on a functional failure
    (lost connections, wrong counters) as opposed to a missed performance target."""
    env = dict(os.environ)
    figs = results["figures"]

    iperf_port = start_iperf3(procs)
    echo_port = free_port()
    echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
    wait_until("the echo target to listen", lambda: listening(echo_port), procs, echo)

    ports = {"raw": {"iperf": iperf_port, "echo": echo_port}}
    if "haproxy" in paths:
        ports["haproxy"] = start_haproxy(procs, tmp, {"iperf": iperf_port, "echo": echo_port}, args.concurrent)
    tunneld = Tunneld(args.tunneld, procs, tmp, env)
    plain = Tunneld(args.tunneld, procs, tmp, env, tls=False)
    daemons = {"direct": tunneld, "tunnel": tunneld, "plain": plain}
    for path, use_tunnel in (("direct", False), ("tunnel", True), ("plain", True)):
        ports[path] = {name: daemons[path].map(port, use_tunnel) for name, port in (("iperf", iperf_port), ("echo", echo_port))}
    for path in RATHOLE_PATHS:
        if path in paths:
            ports[path] = start_rathole(args.rathole, procs, tmp, {"iperf": iperf_port, "echo": echo_port},
                                        tls=path == "rathole-tls")
    log(f"ports: {json.dumps(ports)}")

    # Memory first, on fresh daemons: idle is then really idle, and the per-connection
    # figure is not skewed by whatever the allocator kept from the throughput runs.
    log(f"\n== memory: tunneld idle, then with {args.concurrent} tunneled connections open")
    mem = results["memory"] = hold_and_measure(loadgen, procs, tunneld, ports["tunnel"]["echo"], args.concurrent)
    for role in ("server", "client"):
        m = mem[role]
        log(f"  {role:<7} idle {m['idle_rss_kib'] / 1024:6.2f} MiB, held {m['held_rss_kib'] / 1024:6.2f} MiB, "
            f"{m['per_conn_kib']:6.1f} KiB per connection")
    hold = mem["hold"]
    ok = hold["failures"] == 0 and mem["server_active_connections"] == hold["open"]
    if not ok:
        log(f"  FAILED: hold opened {hold['open']} ({hold['failures']} failures: {hold['errors']}), "
            f"server saw {mem['server_active_connections']} active")

    if "throughput" in args.phases:
        log(f"\n== throughput: iperf3, {args.seconds} s per run" + rounds_note(args.rounds))
        before = {**tunneld.traffic(), **plain.traffic()}
        iperf_raw: dict = {key: {path: [] for path in paths} for key in IPERF_RUNS}
        for key, extra in IPERF_RUNS.items():
            for round_no, path in alternating(paths, args.rounds):
                res = run_iperf(ports[path]["iperf"], args.seconds, extra, rundir / f"iperf3-{key}-{path}-{round_no}.json")
                iperf_raw[key][path].append(res)
                figs[key][path] = median([r["gbps"] for r in iperf_raw[key][path]])
                print_figure(figs, key, path)
        # Every round's bytes crossed the counters: the check sums them all.
        results["iperf3"] = iperf_raw = {key: {path: {"gbps": figs[key][path], "rounds": runs,
                                                      "sent_bytes": sum(r["sent_bytes"] for r in runs),
                                                      "received_bytes": sum(r["received_bytes"] for r in runs)}
                                               for path, runs in by_path.items()} for key, by_path in iperf_raw.items()}
        tunneld.wait_drained([ports[p]["iperf"] for p in ("direct", "tunnel")])
        plain.wait_drained([ports["plain"]["iperf"]])
        counters = results["counters"] = check_counters(before, {**tunneld.traffic(), **plain.traffic()}, iperf_raw,
                                                        {p: ports[p]["iperf"] for p in TUNNELD_PATHS})
        counters_ok = all(d["ok"] for c in counters.values() for d in c.values())
        log(f"  tunneld mapping counters {'match' if counters_ok else 'DO NOT MATCH'} iperf3's byte counts")
        ok &= counters_ok

    if "connrate" in args.phases:
        log(f"\n== connection setup: {args.conns} sequential connect -> 1-byte echo -> close" + rounds_note(args.rounds))
        runs: dict = {path: [] for path in paths}
        for _, path in alternating(paths, args.rounds):
            res = run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[path]['echo']}",
                                        "--count", str(args.conns)], timeout=600)
            runs[path].append(res)
            for key, field in (("conn_rate", "conns_per_s"), ("conn_p50", "p50_us"), ("conn_p99", "p99_us")):
                figs[key][path] = median([r[field] for r in runs[path]])
                print_figure(figs, key, path)
            if res["failures"]:
                # The peer's failures are its own: reported, not this run's verdict.
                ok &= path in RATHOLE_PATHS
                log(f"  FAILED: {res['failures']} connections failed: {res['errors']}")
        results["connrate"] = {path: {"rounds": r} for path, r in runs.items()} if args.rounds > 1 else \
            {path: r[0] for path, r in runs.items()}

    if "concurrency" not in args.phases:
        results["memory_after_load"] = {"server": rss_kib(tunneld.server.pid), "client": rss_kib(tunneld.client.pid)}
        return ok

    log(f"\n== concurrency: {args.concurrent} simultaneous connections, {args.bytes} random bytes echoed each")
    results["concurrent"] = {}
    # Not through rathole: it dials a data channel (and, with TLS, a handshake)
    # per visitor, so a thousand at once measure its pool, not what is compared.
    for path in [p for p in paths if p not in RATHOLE_PATHS]:
        overflows = listen_overflows()
        res = run_loadgen(loadgen, ["concurrent", "--target", f"127.0.0.1:{ports[path]['echo']}",
                                    "--conns", str(args.concurrent), "--bytes", str(args.bytes)], timeout=600)
        # Machine-wide, so other processes' drops would count too; on a quiet
        # loopback they are this run's.
        res["listen_overflows"] = listen_overflows() - overflows
        results["concurrent"][path] = res
        figs["conc_elapsed"][path] = res["elapsed_s"]
        figs["conc_failures"][path] = res["failures"]
        print_figure(figs, "conc_elapsed", path)
        if res["listen_overflows"]:
            log(f"    {res['listen_overflows']} SYNs dropped by a full accept queue (each costs a 1 s retry)")
        if res["failures"]:
            ok = False
            log(f"  FAILED: {res['failures']} of {args.concurrent} failed: {res['errors']}")

    results["memory_after_load"] = {"server": rss_kib(tunneld.server.pid), "client": rss_kib(tunneld.client.pid)}
    return ok


def entry(main) -> None:
    """Runs a benchmark's `main` and exits with the harness's statuses: its own,
    2 when the run could not be done at all, 130 on Ctrl-C."""
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"\nbench: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        log("\nbench: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    entry(main)
