#!/usr/bin/env python3
"""Where the TLS tunnel's CPU goes, per build (issue 24 §3): each binary gets a
TLS server/client pair with a tunneled mapping to iperf3; then, in alternating
order, one `iperf3` stream each way (default: visitor -> target, the server
encrypts; `-R`: the client encrypts, the server decrypts) while
`perf record -e cpu-clock` samples the server and the client, and the shares
of the symbols that copy (`memmove`/`memcpy`), zero (`memset`), allocate (`malloc`, `free`,
`realloc`, glibc's `_int_*`) and fault pages (`clear_page*`, `*page_fault*`)
are summed from `perf report`. Also the CPU seconds per GB each process spent
(schedstat); with --strace-mb, the memory system calls (`mmap`, `munmap`,
`madvise`, `brk`) and all calls per MB under `strace -c -f`; with
--callgrind-mb, the user-space instructions per MB of the server and of the
client, each run under valgrind's callgrind on a pair of its own (counted only
while iperf3 runs: `callgrind_control -z`, `-i on`, `-i off`, `-s`).

    python3 bench/tls_profile.py --binary main=/work/bin/tunneld-21f6 \\
        --binary new=target/release/tunneld [--seconds 5] [--rounds 2] [--strace-mb 512]

Release builds have no frame pointers, so the profiles are flat (self time per
symbol), which is what the shares need.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

GROUPS = {
    "copy": re.compile(r"memmove|memcpy|__memcpy|__memmove"),
    "zeroing": re.compile(r"memset"),
    "alloc": re.compile(r"\bmalloc\b|\bfree\b|realloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|cfree|sysmalloc|unlink_chunk"),
    "page faults": re.compile(r"clear_page|page_fault|do_anonymous_page|handle_mm_fault|__handle_mm_fault|zap_pte|free_pages|alloc_pages|get_page_from_freelist"),
    "aes-gcm": re.compile(r"aes|gcm|ghash|GFp|ring_core", re.I),
    "kernel copy": re.compile(r"_copy_from_iter|_copy_to_iter|copy_user|rep_movs|copyin|copyout"),
}


def perf_shares(report: str) -> tuple[dict, list[str]]:
    shares = {g: 0.0 for g in GROUPS}
    top = []
    for line in report.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(\S.*)$", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2).strip()
        if len(top) < 14:
            top.append(f"{pct:5.2f}% {sym}")
        for g, rx in GROUPS.items():
            if rx.search(sym):
                shares[g] += pct
                break
    return shares, top


def profile(pid: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report(data: Path) -> str:
    return subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "symbol", "--no-children"],
                          capture_output=True, text=True).stdout


def strace_mem(pid: int, out: Path, load) -> dict:
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    moved = load()
    tracer.send_signal(signal.SIGINT)
    tracer.wait(10)
    text = out.read_text()
    calls, total = bench.strace_calls(text)
    mb = moved["received_bytes"] / 1e6
    return {"per_mb": round(total / mb, 2), **{k: round(calls.get(k, 0) / mb, 3) for k in ("mmap", "munmap", "madvise", "brk", "mprotect")},
            "top": {k: round(v / mb, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:8]}}


def callgrind_wrapper(binary: Path, tmp: Path, name: str, role: str) -> Path:
    """A stand-in for `binary` that runs its `role` (server or client) under
    callgrind with instrumentation off until `callgrind_control -i on`, and the
    other role natively."""
    wrapper = tmp / f"callgrind-{name}-{role}.sh"
    out = tmp / f"callgrind-{name}-{role}.%p"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" = "{role}" ]; then
    exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={out} {binary} "$@"
fi
exec {binary} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def callgrind_ir(pid: int, tmp: Path, load) -> tuple[int, dict]:
    """User-space instructions `pid` (under callgrind, see `callgrind_wrapper`)
    executed while `load()` ran: zeroed, collected, dumped, read from the dump."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    moved = load()
    before = set(tmp.glob(f"callgrind-*.{pid}*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    dumps = sorted(set(tmp.glob(f"callgrind-*.{pid}*")) - before, key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise bench.BenchError(f"callgrind wrote no dump for {pid}")
    text = dumps[-1].read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
    if not m:
        raise bench.BenchError(f"no totals in {dumps[-1]}")
    return int(m.group(1)), moved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--strace-mb", type=int, default=0)
    ap.add_argument("--callgrind-mb", type=int, default=0,
                    help="also count the server's and the client's user-space instructions per MB under callgrind "
                         "(each on a pair of its own) while iperf3 moves this many MB each way")
    args = ap.parse_args()
    binaries = dict(spec.split("=", 1) for spec in args.binary)
    rundir = bench.RESULTS_DIR / ("tlsprof-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    rundir.mkdir(parents=True)
    bench.log(f"logs in {rundir.relative_to(bench.REPO)}; binaries {binaries}")
    results: dict = {"binaries": binaries, "perf": {}, "cpu_s_per_gb": {}, "gbps": {}, "strace": {}}
    with tempfile.TemporaryDirectory(prefix="tunneld-tlsprof-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(rundir)
        try:
            iperf_port = bench.free_port()
            iperf = procs.spawn("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port), "--rcv-timeout", "10000"])
            bench.wait_until("iperf3 -s to listen", lambda: bench.listening(iperf_port), procs, iperf)
            pairs, ports = {}, {}
            for name, binary in binaries.items():
                home = tmp / name
                home.mkdir()
                pairs[name] = bench.Tunneld(Path(binary), procs, home, dict(bench.os.environ), name=f"{name}-tls")
                ports[name] = pairs[name].map(iperf_port, True)
            if args.callgrind_mb:
                for name, binary in binaries.items():
                    for role in ("server", "client"):
                        home = tmp / f"cg-{name}-{role}"
                        home.mkdir()
                        wrapped = callgrind_wrapper(Path(binary).resolve(), tmp, name, role)
                        pair = bench.Tunneld(wrapped, procs, home, dict(bench.os.environ), name=f"{name}-cg-{role}")
                        port = pair.map(iperf_port, True)
                        for suffix, extra in (("", []), ("_R", ["-R"])):
                            ir, moved = callgrind_ir(getattr(pair, role).pid, tmp, lambda: bench.run_iperf(
                                port, 0, ["-n", f"{args.callgrind_mb}M", *extra],
                                rundir / f"iperf3-callgrind-{name}-{role}{suffix}.json"))
                            per_mb = ir / (moved["received_bytes"] / 1e6)
                            results.setdefault("instructions_per_mb", {}).setdefault(name + suffix, {})[role] = per_mb
                            bench.log(f"callgrind {name}{suffix} {role}: {per_mb / 1e6:.3f} M instructions per MB")
                        procs.stop(pair.client)
                        procs.stop(pair.server)
            if args.strace_mb:
                for name in binaries:
                    for suffix, extra in (("", []), ("_R", ["-R"])):
                        for role in ("server", "client"):
                            pid = getattr(pairs[name], role).pid
                            sc = strace_mem(pid, rundir / f"strace-{name}{suffix}-{role}.txt", lambda: bench.run_iperf(
                                ports[name], 0, ["-n", f"{args.strace_mb}M", *extra], rundir / f"iperf3-strace-{name}{suffix}-{role}.json"))
                            results["strace"].setdefault(name + suffix, {})[role] = sc
                            bench.log(f"strace {name}{suffix} {role}: {sc['per_mb']} calls/MB, mmap {sc['mmap']} munmap "
                                      f"{sc['munmap']} madvise {sc['madvise']} brk {sc['brk']} per MB; {sc['top']}")
            for round_no in range(args.rounds):
                order = list(binaries) if round_no % 2 == 0 else list(reversed(binaries))
                for name in order:
                    for suffix, extra in (("", []), ("_R", ["-R"])):
                        pair = pairs[name]
                        pids = {"server": pair.server.pid, "client": pair.client.pid}
                        data = {role: rundir / f"perf-{name}{suffix}-{role}-{round_no}.data" for role in pids}
                        perfs = {role: profile(pid, data[role]) for role, pid in pids.items()}
                        time.sleep(0.5)
                        cpu_before = {role: bench.cpu_ns(pid) for role, pid in pids.items()}
                        res = bench.run_iperf(ports[name], args.seconds, extra, rundir / f"iperf3-{name}{suffix}-{round_no}.json")
                        cpu = {role: bench.cpu_ns(pid) - cpu_before[role] for role, pid in pids.items()}
                        for p in perfs.values():
                            p.send_signal(signal.SIGINT)
                        for p in perfs.values():
                            p.wait(60)
                        gb = res["received_bytes"] / 1e9
                        key = name + suffix
                        results["gbps"].setdefault(key, []).append(res["gbps"])
                        line = f"round {round_no + 1} {key:12} {res['gbps']:6.2f} Gbit/s"
                        for role in pids:
                            results["cpu_s_per_gb"].setdefault(key, {}).setdefault(role, []).append(cpu[role] / 1e9 / gb)
                            shares, top = perf_shares(report(data[role]))
                            results["perf"].setdefault(key, {}).setdefault(role, []).append({"shares": shares, "top": top})
                            line += (f" | {role} {cpu[role] / 1e9 / gb:.3f} s/GB, " +
                                     ", ".join(f"{g} {v:.1f}%" for g, v in shares.items()))
                            data[role].unlink(missing_ok=True)
                        bench.log(line)
        finally:
            procs.stop_all()
    bench.log("medians:")
    for key in results["gbps"]:
        line = f"{key:12} {statistics.median(results['gbps'][key]):6.2f} Gbit/s"
        for role in ("server", "client"):
            cpu = statistics.median(results["cpu_s_per_gb"][key][role])
            shares = {g: statistics.median(r["shares"][g] for r in results["perf"][key][role]) for g in GROUPS}
            line += f" | {role} {cpu:.3f} s/GB " + ", ".join(f"{g} {v:.1f}%" for g, v in shares.items())
        bench.log(line)
    for key in results["perf"]:
        for role in ("server", "client"):
            bench.log(f"top symbols {key} {role} (last round):")
            for t in results["perf"][key][role][-1]["top"]:
                bench.log("    " + t)
    (rundir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    bench.entry(main)
