"""What the bench scripts share: starting a server on a loopback port, reading a process's CPU and
memory from /proc, the machine's description and load, the floor programs (conductor-floor and
cyclictest), and the probe split over processes.

Measuring only: nothing here decides what a result means. Every process it starts is bounded in
time and stopped by the script that started it.
"""

import json
import os
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RELEASE = ROOT / "target" / "release"
SERVER = Path(os.environ.get("CONDUCTOR_BENCH_SERVER", RELEASE / "conductor"))
PROBE = RELEASE / "conductor-probe"
FLOOR = RELEASE / "conductor-floor"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
# The timing thread's name (src/timing.rs) as /proc shows it (comm keeps 15 bytes): its spin
# before each tick is no part of the cost of a message.
TIMING_THREAD = "conductor-timing"[:15]


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def smaps_rollup(pid):
    """`/proc/PID/smaps_rollup` as {field: KiB}, or {} where the kernel has none."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                m = re.match(r"(\w+):\s+(\d+) kB", line)
                if m:
                    out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


def cpu_seconds(pid):
    """User + system CPU of the whole process (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid):
    """{thread name: CPU seconds} summed by name, from each thread's schedstat (ns resolution;
    falls back to stat). Threads that ended are not in it."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            try:
                ns = int((task / "schedstat").read_text().split()[0])
                secs = ns / 1e9
            except (OSError, ValueError, IndexError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                secs = (int(fields[11]) + int(fields[12])) / CLK_TCK
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + secs
    return out


def established(port):
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=False,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except Exception:
        return None


def get_metrics(url):
    """Prometheus text as {name{labels}: value}; {} when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def raise_nofile():
    """Raises this process's soft open-files limit to the hard one (children inherit it) and
    returns the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ServerStartError(Exception):
    """The server exited at start; `unsupported` names a flag it does not know."""

    def __init__(self, message, unsupported=None):
        super().__init__(message)
        self.unsupported = unsupported


class Server:
    """A tick server process on a loopback port. Its stderr goes to a file, so a refusal to
    start can be told apart from a crash."""

    def __init__(self, name, argv, port, env=None, probe_args=None, has_stats=False):
        self.name, self.port, self.has_stats = name, port, has_stats
        self.probe_args = probe_args
        self.argv = argv
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            start_new_session=True, cwd=ROOT,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise self._start_error()
                time.sleep(0.1)
        else:
            self.stop()
            raise ServerStartError(f"{name} did not listen on port {port}")
        time.sleep(0.5)

    def _start_error(self):
        self.stderr.seek(0)
        text = self.stderr.read().strip()
        last = text.splitlines()[-3:] if text else []
        m = re.search(r"unexpected argument '(--[\w-]+)'", text)
        if m:
            return ServerStartError(
                f"{self.name} does not take {m.group(1)} (exit {self.proc.returncode}): "
                f"{' / '.join(last)}", unsupported=m.group(1))
        return ServerStartError(f"{self.name} exited at start (exit {self.proc.returncode}): {' / '.join(last)}")

    @property
    def pid(self):
        return self.proc.pid

    def stats(self):
        return get_json(f"http://127.0.0.1:{self.port}/stats") if self.has_stats else None

    def metrics(self):
        return get_metrics(f"http://127.0.0.1:{self.port}/metrics") if self.has_stats else {}

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except Exception:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except Exception:
                pass


def start_conductor(bpm, socketio=False, extra=(), server=None, wrap=()):
    """conductor on a free loopback port; `wrap` runs it under another program (heaptrack)."""
    port = free_port()
    probe_args = ["--socketio", f"http://127.0.0.1:{port}"] if socketio else [f"ws://127.0.0.1:{port}/ws"]
    return Server(
        "conductor (Socket.IO)" if socketio else "conductor",
        [*wrap, str(server or SERVER), "--port", str(port), "--bind", "127.0.0.1", "--bpm", str(bpm), "--max-bpm", "200",
         "--max-clients", "10000000", "--state", "none", *extra],
        port,
        env={"RUST_LOG": "warn"},
        probe_args=probe_args,
        has_stats=True,
    )


def load_average():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def src_commit():
    """The last commit that changed the server's source: what was measured."""
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", "src"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def machine_meta(command):
    """Who, where and when: goes at the top of every results file."""
    return {
        "run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": os.uname().release,
        "commit": git_commit(),
        "src_commit": src_commit(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "load_at_start": load_average(),
        "command": command,
    }


def meta_line(meta):
    load = meta.get("load_at_start")
    end = meta.get("load_at_end")
    loads = f"load {load[0]:.2f} at start" if load else ""
    if end:
        loads += f", {end[0]:.2f} at end"
    return (f"Run {meta['run']} on {meta['host']} ({meta['cores']} × {meta['cpu']}, {meta['memory_gib']} GiB, "
            f"kernel {meta['kernel']}, commit {meta['commit']}, src/ as of {meta.get('src_commit', '?')}; {loads}; "
            f"open files {meta['nofile']:,} a process)")


def build_release():
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=ROOT, check=True)


def tick_frame_bytes(port, timeout=5.0):
    """The size on the wire of a real tick frame from the server on `port`: opens one
    WebSocket, reads frames until a tick, returns header + payload bytes (or None)."""
    import base64
    key = base64.b64encode(os.urandom(16)).decode()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None
    try:
        s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return None
            buf += chunk
        buf = buf.split(b"\r\n\r\n", 1)[1]
        deadline = time.time() + timeout
        while time.time() < deadline:
            while len(buf) >= 2:
                n = buf[1] & 0x7F
                head = 2
                if n == 126:
                    if len(buf) < 4:
                        break
                    n, head = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127:
                    if len(buf) < 10:
                        break
                    n, head = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) < head + n:
                    break
                payload = buf[head:head + n]
                buf = buf[head + n:]
                if b'"tick"' in payload[:40]:
                    return head + n
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None
    finally:
        s.close()
    return None


def run_floor(clients, threads, rate, duration, frame_bytes, tag, warmup=1.0):
    """conductor-floor with the server run's N, rate and frame; its report, or {'error': …}."""
    path = RESULTS / f"floor-{tag}.json"
    argv = [str(FLOOR), "--clients", str(clients), "--threads", str(threads), "--rate", f"{rate:.6f}",
            "--duration", str(duration), "--warmup", str(warmup), "--frame-bytes", str(frame_bytes),
            "--json", str(path)]
    log(f"floor-{tag}: {clients} sockets, {threads} thread(s), {frame_bytes}-byte frame at {rate:.3f}/s for {duration:g} s")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 120 + clients / 500)
    if r.returncode != 0 or not path.exists():
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"floor-{tag}: failed: {err}")
        return {"error": err, "clients": clients, "threads": threads}
    report = json.loads(path.read_text())
    log(f"floor-{tag}: {report['cpu_us_per_write']:.2f} µs CPU per write, pass p50 {report['pass_us']['p50']:,.0f} µs")
    return report


def cyclictest(duration_s):
    """Wake-up latency of a timer thread on this machine (rt-tests' cyclictest), µs:
    {'min', 'avg', 'max', 'p50', 'p99', 'priority', ...} or {'error': ...}. SCHED_FIFO 50 (the
    timing thread's --rt-priority default) when allowed, else the normal scheduler."""
    exe = shutil.which("cyclictest")
    if not exe:
        return {"error": "cyclictest not installed: apt-get install rt-tests"}
    out = {}
    for prio in (50, 0):
        with tempfile.NamedTemporaryFile(suffix=".json") as js:
            argv = [exe, "--quiet", "--mlockall", "--interval=1000", f"--duration={int(duration_s)}",
                    "--threads=1", "--histogram=20000", f"--json={js.name}"]
            if prio:
                argv.append(f"--priority={prio}")
            r = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
            try:
                t = json.load(open(js.name))["thread"]["0"]
            except Exception:
                t = None
            if r.returncode != 0 or not t:
                out = {"error": (r.stderr.strip().splitlines() or ["cyclictest failed"])[-1]}
                continue
            hist = {int(k): int(v) for k, v in t.get("histogram", {}).items()}
            total = sum(hist.values())

            def pct(q):
                if not total:
                    return None
                seen = 0
                for us in sorted(hist):
                    seen += hist[us]
                    if seen >= q * total:
                        return us
                return max(hist)

            out = {"priority": prio, "scheduler": "SCHED_FIFO" if prio else "SCHED_OTHER",
                   "duration_s": duration_s, "interval_us": 1000, "samples": total,
                   "min": t.get("min"), "avg": t.get("avg"), "max": t.get("max"), "p50": pct(0.5), "p99": pct(0.99)}
            return out
    return out


class SplitProbe:
    """The probe over several processes, each under its open-files limit and from its own
    loopback source addresses, all measuring one window; `finish` merges their reports into
    the one a single process would have written (`conductor-probe --merge`)."""

    def __init__(self, probe_args, clients, per_process, duration, tag, query=(), label=None, connect_rate=400):
        self.tag, self.duration, self.label = tag, duration, label or tag
        procs = max(1, -(-clients // per_process))
        self.shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        offsets, at = [], 0
        for n in self.shares:
            offsets.append(at)
            at += max(1, -(-n // 20000))
        if at > 254:
            raise ValueError(f"{clients:,} clients need {at} loopback source addresses, more than 254")
        # Measuring starts once every process should be connected: `connect_rate` a second each
        # (about 400 on the loaded 2-core machine, far more on a big one).
        self.measure_at = time.time() + 10 + max(self.shares) / connect_rate
        self.children, self.paths = [], []
        for i, (n, off) in enumerate(zip(self.shares, offsets)):
            path = RESULTS / f"{tag}-p{i}.json.tmp"
            self.paths.append(path)
            argv = [str(PROBE), *probe_args, "--clients", str(n), "--duration", str(duration), "--raw",
                    "--json", str(path), "--source-offset", str(off), "--measure-at", f"{self.measure_at:.3f}",
                    "--timeout", "30", "--label", f"{tag} part {i + 1}/{procs}"]
            for q in query:
                argv += ["--query", q]
            self.children.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                  text=True))
        log(f"{tag}: {clients:,} clients over {procs} probe process(es) of {self.shares}, "
            f"measuring from +{self.measure_at - time.time():.0f} s for {duration:g} s")

    def running(self):
        return any(c.poll() is None for c in self.children)

    def finish(self):
        """(merged report or None, [errors])."""
        errors = []
        for child, path in zip(self.children, self.paths):
            try:
                _, err = child.communicate(timeout=max(0, self.measure_at - time.time()) + self.duration + 300)
            except subprocess.TimeoutExpired:
                child.kill()
                _, err = child.communicate()
                errors.append("a probe process did not finish in time")
            if child.returncode != 0 or not path.exists():
                errors.append((err.strip().splitlines() or [f"probe exit {child.returncode}"])[-1])
        parts = [p for p in self.paths if p.exists()]
        if not parts:
            return None, errors
        merged = RESULTS / f"{self.tag}.json"
        r = subprocess.run([str(PROBE), "--merge", *map(str, parts), "--json", str(merged), "--label", self.label],
                           capture_output=True, text=True)
        for p in self.paths:
            p.unlink(missing_ok=True)
        if r.returncode != 0:
            errors.append((r.stderr.strip().splitlines() or ["merge failed"])[-1])
            return None, errors
        return json.loads(merged.read_text()), errors
