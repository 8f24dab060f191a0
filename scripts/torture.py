#!/usr/bin/env python3
"""Hostile input and faults against the real bitfog binary; prints figures.

Run by scripts/torture.sh (which builds the release binary). Everything goes
to 127.0.0.1 and a temporary directory. Sections:

  requests  generated hostile requests against `bitfog serve`, by class, each
            class with a positive control that shows the detector works
  fetch     kill -9 of `fetch` at random points over a mixed tree
  put       kill -9 of the server while `store` uploads, restart, rerun
  disk      fetch into a full courier and store into a full area (tmpfs)
  inject    I/O errors injected with strace into fetch and into serve
  load      64 clients (listings, ranges, PUTs, all checked) for 60 s with
            500 idle connections open; LOAD_SECONDS changes the duration
  delta     kill -9 of `fetch` while it makes a delta, and of the server
            while it patches: the file is always the old or the new version
  courier   hostile couriers: symlinks at state paths, state directories and
            above carried names, FIFOs and crafted records, then fetch and
            store: nothing outside changes, nothing hangs
  unreadable  source directories the server (as nobody) cannot read: each
            counted in `skipped`, store --delete deletes nothing (root)
  record    4,500 long empty directories made over HTTP: the end record
            stays within what clients accept
  cpu       small requests that ask for much work: server CPU per request,
            also after the client left

Usage: torture.py BITFOG [requests|fetch|put|delta ...] [--rounds N]
"""

import atexit
import hashlib
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.stdout.reconfigure(line_buffering=True)
BIN = sys.argv[1]
ARGS = sys.argv[2:]
ROUNDS = 100
if "--rounds" in ARGS:
    i = ARGS.index("--rounds")
    ROUNDS = int(ARGS[i + 1])
    del ARGS[i:i + 2]
SECTIONS = ARGS or ["requests", "fetch", "put", "disk", "inject", "load", "delta", "courier",
                    "unreadable", "record", "cpu"]
SECRET = b"TOPSECRET-OUTSIDE-THE-AREA"
rng = random.Random(20261126)

# Every process a section starts, so that one stopped by an exception or a
# signal leaves no server or client running behind it.
STARTED = []


def popen(*args, **kwargs):
    p = subprocess.Popen(*args, **kwargs)
    STARTED.append(p)
    return p


def stop_started():
    for p in STARTED:
        if p.poll() is None:
            try:
                # A process leading its own group (strace) takes its
                # traced children with it.
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
            except ProcessLookupError:
                pass
            p.wait()


atexit.register(stop_started)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def snapshot(root):
    """Every path below root with a hash of its content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out[p] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[p] = "dir"
    return out


class Server:
    def __init__(self, conf, log, threads=4):
        self.conf, self.log, self.threads = conf, log, threads
        self.start()

    def start(self):
        self.logf = open(self.log, "ab")
        start = self.logf.tell()
        self.proc = popen(
            [BIN, "serve", "--conf", self.conf, "--addr", "127.0.0.1:0", "--threads", str(self.threads),
             "--cache", self.log + ".hashcache"],
            stdout=subprocess.DEVNULL, stderr=self.logf)
        deadline = time.time() + 10
        while time.time() < deadline:
            with open(self.log, "rb") as f:
                f.seek(start)
                for line in f.read().decode(errors="replace").splitlines(keepends=True):
                    if line.startswith("bitfog: listening on http://") and line.endswith("\n"):
                        host, port = line.strip().rsplit("/", 1)[0].split("//")[1].rsplit(":", 1)
                        self.addr = (host, int(port))
                        return
            time.sleep(0.01)
        raise SystemExit("server did not start")

    def url(self, area):
        return "http://%s:%d/%s/" % (self.addr[0], self.addr[1], area)

    def alive(self):
        return self.proc.poll() is None

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)


def exchange(addr, data, timeout=5.0, close_early=False):
    """Sends raw bytes; returns (response bytes, hung). `hung` means no
    answer and no close within `timeout` for a request that was complete."""
    s = socket.create_connection(addr, timeout=timeout)
    try:
        s.sendall(data)
    except OSError:
        pass
    if close_early:
        s.close()
        return b"", False
    out = b""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            s.settimeout(max(0.01, deadline - time.time()))
            chunk = s.recv(65536)
            if not chunk:
                return out, False
            out += chunk
    except socket.timeout:
        return out, out == b""
    except OSError:
        return out, False
    finally:
        s.close()
    return out, out == b""


def request(method, path, headers=(), body=b""):
    head = "%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" % (method, path)
    for k, v in headers:
        head += "%s: %s\r\n" % (k, v)
    if body or method == "PUT":
        head += "Content-Length: %d\r\n" % len(body)
    return head.encode("latin-1") + b"\r\n" + body


def healthy(addr):
    t = time.time()
    try:
        out, _ = exchange(addr, request("GET", "/"), timeout=2)
    except OSError:
        return False
    return out.startswith(b"HTTP/1.1 200") and time.time() - t < 2


def section_requests():
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst, tok, outside = (os.path.join(work, d) for d in ("src", "dst", "tok", "outside"))
    write(os.path.join(outside, "secret.txt"), SECRET)
    write(os.path.join(src, "file.txt"), b"plain")
    write(os.path.join(src, "real", "copy.txt"), SECRET)  # control: a secret inside
    write(os.path.join(src, "sub", "x.txt"), b"x")
    write(os.path.join(tok, "t.txt"), SECRET)
    write(os.path.join(dst, "keep"), b"keep")
    os.symlink(outside, os.path.join(src, "ln_dir"))
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(src, "ln_file"))
    os.symlink("..", os.path.join(src, "sub", "ln_up"))
    os.symlink("../outside", os.path.join(src, "ln_rel"))
    os.symlink(outside, os.path.join(dst, "ln_dir"))
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(dst, "ln_file"))
    conf = os.path.join(work, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true},'
                '"tok":{"path":"%s","token":"s3cret"}}' % (src, dst, tok))
    srv = Server(conf, os.path.join(work, "serve.log"))
    before_outside = snapshot(outside)
    before_src = snapshot(src)
    rows = []

    def run_class(name, cases, control):
        escapes = hangs = deaths = 0
        for method, raw, check in cases:
            out, hung = exchange(srv.addr, raw)
            if hung:
                hangs += 1
            if check(out):
                escapes += 1
                print("  ESCAPE %s: %r" % (name, raw[:200]))
            if not srv.alive():
                deaths += 1
                srv.start()
        if snapshot(outside) != before_outside:
            escapes += 1
            print("  ESCAPE %s: the outside directory changed" % name)
        ok = control()
        healthy_now = healthy(srv.addr)
        rows.append((name, len(cases), escapes, deaths, hangs, "yes" if ok else "NO", healthy_now))

    leaks = lambda out: SECRET in out
    never = lambda out: False

    # 1. Traversal in every encoding, every method, three areas.
    dots = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae", "..%00", "..;", "%2e%2e%00"]
    seps = ["/", "%2f", "%2F", "%5c", "\\", "%252f", "//", "%c0%af"]
    prefixes = ["/src/", "/dst/", "/src/sub/", "/tok/", "/"]
    cases = []
    for d, s_, depth, pre in itertools.product(dots, seps, (1, 2, 3, 5), prefixes):
        target = "outside" + s_ + "secret.txt"
        path = pre + (d + s_) * depth + target
        method = rng.choice(["GET", "HEAD", "DELETE", "PUT"])
        cases.append((method, request(method, path, body=b"PLANTED" if method == "PUT" else b""), leaks))

    def traversal_control():
        out, _ = exchange(srv.addr, request("GET", "/src/real/copy.txt"))
        return leaks(out)
    run_class("traversal", cases, traversal_control)

    # 2. Symlinks in every position, every method.
    paths = ["/src/ln_dir/secret.txt", "/src/ln_file", "/src/sub/ln_up/ln_file", "/src/sub/ln_up/ln_dir/secret.txt",
             "/src/ln_rel/secret.txt", "/src/ln_dir%2fsecret.txt", "/src/ln_dir/", "/dst/ln_dir/secret.txt",
             "/dst/ln_dir/new.txt", "/dst/ln_dir/deep/new.txt", "/dst/ln_file", "/src/sub/ln_up/real/copy.txt",
             "/src/ln_dir/../file.txt", "/src/./ln_file"]
    cases = []
    for p, method in itertools.product(paths, ["GET", "HEAD", "PUT", "DELETE"]):
        for variant in (p, p.replace("/", "%2F").replace("%2F", "/", 1), p.replace("ln_", "ln%5f")):
            cases.append((method, request(method, variant, body=b"PLANTED" if method == "PUT" else b""), leaks))
    run_class("symlinks", cases, traversal_control)
    # Restore dst's links that a PUT or DELETE on the link itself replaced.
    for n, t in (("ln_dir", outside), ("ln_file", os.path.join(outside, "secret.txt"))):
        p = os.path.join(dst, n)
        if os.path.lexists(p):
            os.remove(p)
        os.symlink(t, p)

    # 3. Methods on a read-only area.
    methods = ["PUT", "DELETE", "POST", "PATCH", "MKCOL", "MOVE", "COPY", "PROPFIND", "OPTIONS", "TRACE", "LOCK", "CONNECT"]
    targets = ["/src/file.txt", "/src/new.txt", "/src/", "/src", "/src/sub/x.txt", "/src/real/new/deep.txt"]
    cases = []
    for m, t in itertools.product(methods, targets):
        for hdrs in ((), (("Content-Type", "application/symlink"),), (("X-Bitfog-Sha256", "0" * 64),)):
            cases.append((m, request(m, t, hdrs, b"/etc/passwd"), lambda out: out[9:10] == b"2"))
    def readonly_control():
        out, _ = exchange(srv.addr, request("PUT", "/dst/control.txt", body=b"ok"))
        return out.startswith(b"HTTP/1.1 204") and os.path.exists(os.path.join(dst, "control.txt"))
    run_class("read-only", cases, readonly_control)
    if snapshot(src) != before_src:
        print("  ESCAPE read-only: the read-only area changed")
        rows[-1] = rows[-1][:2] + (rows[-1][2] + 1,) + rows[-1][3:]

    # 4. Tokens.
    variants = [None, "", "Bearer", "Bearer ", "Bearer s3cre", "Bearer s3cretX", "Bearer s3cret s3cret", "Basic czNjcmV0",
                "s3cret", "Bearer S3CRET", "Bearer s3cret\x00", "Token s3cret", "Bearer s3cr%65t"]
    cases = []
    for v, p, m in itertools.product(variants, ["/tok/t.txt", "/tok/", "/tok", "/tok/%74.txt", "/tok/../tok/t.txt"],
                                     ["GET", "HEAD", "PUT", "DELETE"]):
        hdrs = () if v is None else (("Authorization", v),)
        cases.append((m, request(m, p + ("?token=s3cret" if rng.random() < 0.2 else ""), hdrs), leaks))
    def token_control():
        # After so many wrong tokens this address must wait (429 with
        # Retry-After) before even a right one is looked at.
        for _ in range(3):
            out, _ = exchange(srv.addr, request("GET", "/tok/t.txt", (("Authorization", "Bearer s3cret"),)))
            if not out.startswith(b"HTTP/1.1 429"):
                return leaks(out)
            wait = [l for l in out.split(b"\r\n") if l.lower().startswith(b"retry-after:")]
            time.sleep(int(wait[0].split(b":")[1]) + 0.2 if wait else 1)
        return False
    run_class("tokens", cases, token_control)

    # 5. Malformed framing: answered or closed, never a death or a hang;
    #    a request hidden in a body is never run.
    keep = os.path.join(dst, "keep")
    smuggled = b"DELETE /dst/keep HTTP/1.1\r\nHost: t\r\n\r\n"
    frames = [
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 100000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 10000 + b"\r\n",
        b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: t\nConnection: close\n\n",
        b"GET /\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
        b"GET / HTTP/1.1\r\nHost: t\x00evil\r\n\r\n",
        b"GET /src/\xff\xfe HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /src/file.txt HTTP/1.1\r\nRange: bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(2000)) + b"\r\nConnection: close\r\n\r\n",
        b"GET /src/file.txt HTTP/1.1\r\nRange: bytes=99999999999999999999-\r\nConnection: close\r\n\r\n",
        b"GET /src/file.txt HTTP/1.1\r\nRange: bytes=-99999999999999999999\r\nConnection: close\r\n\r\n",
        b"PUT /dst/te HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: " + b"%d" % len(smuggled) + b"\r\n\r\n" + smuggled,
        b"PUT /dst/te HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n",
        b"PUT /dst/cl HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: " + b"%d" % len(smuggled) + b"\r\n\r\nhello" + smuggled,
        b"PUT /dst/cl HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"PUT /dst/cl HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
        b"PUT /dst/cl HTTP/1.1\r\nContent-Length:  0x5\r\n\r\nhello",
        b"PUT /dst/cl HTTP/1.1\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello" + smuggled,
        b"GET /src/file.txt HTTP/1.0\r\nContent-Length: 0\r\n\r\n" + smuggled,
        b"PUT /dst/cl HTTP/1.1\r\n Content-Length: 5\r\n\r\nhello",
        b"PUT /dst/cl HTTP/1.1\r\nContent-Length\t: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 50 + b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nExpect: something-else\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/7.9\r\n\r\n",
        b"G\x00ET / HTTP/1.1\r\n\r\n",
        b"GET  /  HTTP/1.1\r\n\r\n",
        b"GET http://evil/src/file.txt HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]
    cases = [("RAW", f, never) for f in frames]
    for _ in range(400):  # random garbage and mutations of a valid head
        base = bytearray(rng.choice(frames[:6] + [request("GET", "/src/file.txt")]))
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(base))
            base[i] = rng.randrange(256)
        cases.append(("RAW", bytes(base), never))
    start = time.time()
    # Bodies cut short: the client closes mid-body.
    for n in range(30):
        cases.append(("CUT", b"PUT /dst/cut%d HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" % n + b"x" * rng.randrange(99999), never))
    escapes = deaths = hangs = 0
    for method, raw, _ in cases:
        if method == "CUT":
            exchange(srv.addr, raw, close_early=True)
        else:
            complete = b"\r\n\r\n" in raw or b"\n\n" in raw
            # An incomplete head gets its 408 after 10 s; no need to wait.
            out, hung = exchange(srv.addr, raw, timeout=12 if complete else 0.3)
            if hung and complete and b"Content-Length: 99999999999999" not in raw:
                hangs += 1
                print("  HANG framing: %r" % raw[:120])
        if not srv.alive():
            deaths += 1
            srv.start()
    time.sleep(0.5)
    if not os.path.exists(keep):
        escapes += 1
        print("  ESCAPE framing: a smuggled DELETE ran")
    leftovers = [p for p in snapshot(dst) if "cut" in os.path.basename(p) or ".bitfog-tmp" in p]
    if leftovers:
        escapes += 1
        print("  ESCAPE framing: cut-short uploads left files: %s" % leftovers[:5])
    def framing_control():
        # A real pipelined pair and a real PUT work, so the checks above could fail.
        out, _ = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n" + request("PUT", "/dst/smuggle-control", body=b"x"))
        return out.count(b"HTTP/1.1 2") == 2 and os.path.exists(os.path.join(dst, "smuggle-control"))
    rows.append(("framing", len(cases), escapes, deaths, hangs, "yes" if framing_control() else "NO", healthy(srv.addr)))

    # 6. Slow and idle clients while legitimate requests keep being served.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    idle = []
    for _ in range(2000):
        try:
            idle.append(socket.create_connection(srv.addr))
        except OSError:
            break
    slow = [socket.create_connection(srv.addr) for _ in range(20)]
    worst = 0.0
    for second in range(5):
        for s in slow:
            try:
                s.send(b"G" if second == 0 else b"x")
            except OSError:
                pass
        t = time.time()
        ok = healthy(srv.addr)
        worst = max(worst, time.time() - t)
        time.sleep(1)
    for s in idle + slow:
        s.close()
    rows.append(("idle+slow", len(idle) + len(slow), 0, 0 if srv.alive() else 1, 0 if ok else 1,
                 "worst %.3fs" % worst, healthy(srv.addr)))
    # Body-phase stalls and slow readers hold a worker each (4 here), until
    # the body timeout or the rate check drops them.
    write(os.path.join(src, "big.bin"), os.urandom(64 << 20))
    stalled = []
    for i in range(6):
        s_ = socket.create_connection(srv.addr)
        if i % 2:
            s_.sendall(b"PUT /dst/stall%d HTTP/1.1\r\nContent-Length: 1000000\r\n\r\nx" % i)
        else:
            s_.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s_.sendall(b"GET /src/big.bin HTTP/1.1\r\n\r\n")
        stalled.append(s_)
    # More stalled bodies and slow readers than workers: a worker gives up
    # on a client stalled for a second while others wait.
    worst, t0 = 0.0, time.time()
    while time.time() - t0 < 25:
        t = time.time()
        try:
            out, _ = exchange(srv.addr, request("GET", "/"), timeout=30)
        except OSError:
            out = b""
        worst = max(worst, time.time() - t)
        time.sleep(0.5)
    for s_ in stalled:
        s_.close()
    rows.append(("stalls", len(stalled), 0, 0 if srv.alive() else 1, 0, "worst %.1fs" % worst, healthy(srv.addr)))

    srv.stop()
    print("\nhostile requests against serve (%.1f s)" % (time.time() - start))
    print("%-10s %6s %8s %7s %6s %-12s %s" % ("class", "cases", "escapes", "deaths", "hangs", "control", "healthy after"))
    total = 0
    for r in rows:
        total += r[1]
        print("%-10s %6d %8d %7d %6d %-12s %s" % r)
    print("total cases: %d" % total)
    shutil.rmtree(work, ignore_errors=True)


def mixed_tree(root):
    sizes = [0, 0, 1, 100, 4096, 65536, 100000, 1 << 20, 3 << 20, 10 << 20, 30 << 20, 100 << 20]
    sizes += [rng.randrange(1, 200000) for _ in range(40)]
    for i, n in enumerate(sizes):
        write(os.path.join(root, "d%d" % (i % 4), "f%03d" % i), os.urandom(n))
    return sum(sizes)


def served_file_bytes(log, area):
    """Bytes the server sent for file GETs of an area, from its log."""
    total = 0
    with open(log, errors="replace") as f:
        for line in f:
            parts = line.split()
            # [TIME] bitfog: PEER "METHOD TARGET" STATUS BYTES
            at = next((k for k, p in enumerate(parts) if p.startswith('"')), None)
            if at is None or len(parts) < at + 4:
                continue
            if parts[at] == '"GET' and parts[at + 1].startswith("/%s/" % area) and parts[at + 1] != "/%s/\"" % area:
                total += int(parts[-1])
    return total


def courier_bytes(courier):
    total = 0
    for dirpath, _, files in os.walk(courier):
        if "/.bitfog" in dirpath and "partial" not in dirpath:
            continue
        for n in files:
            if n.endswith(".json") or n in ("lock", "carried.jsonl"):
                continue
            total += os.path.getsize(os.path.join(dirpath, n))
    return total


def wrong_final_files(courier, src):
    bad = 0
    for dirpath, _, files in os.walk(courier):
        if "/.bitfog" in dirpath:
            continue
        for n in files:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, courier)
            with open(p, "rb") as a, open(os.path.join(src, rel), "rb") as b:
                if a.read() != b.read():
                    bad += 1
                    print("  WRONG CONTENT at final path: %s" % rel)
    return bad


def section_fetch():
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src = os.path.join(work, "src")
    total = mixed_tree(src)
    conf = os.path.join(work, "c.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"}}' % src)
    log = os.path.join(work, "serve.log")
    srv = Server(conf, log)
    dest_db = os.path.join(work, "dest.db")
    courier = os.path.join(work, "courier")
    subprocess.run([BIN, "emptydb", dest_db], check=True, stdout=subprocess.DEVNULL)
    t = time.time()
    subprocess.run([BIN, "fetch", dest_db, srv.url("src"), os.path.join(work, "probe"), "-q"], check=True, stdout=subprocess.DEVNULL)
    full = time.time() - t
    shutil.rmtree(os.path.join(work, "probe"))
    base = served_file_bytes(log, "src")
    waste, wrong, kills = [], 0, 0
    for i in range(ROUNDS):
        held_before = courier_bytes(courier) if os.path.exists(courier) else 0
        served_before = served_file_bytes(log, "src")
        p = popen([BIN, "fetch", dest_db, srv.url("src"), courier, "-q"], stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full * 0.6))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.wait()
        time.sleep(0.05)
        wrong += wrong_final_files(courier, src)
        progress = courier_bytes(courier) - held_before
        served = served_file_bytes(log, "src") - served_before
        waste.append(max(0, served - progress))
        if p.returncode == 0:  # finished before the kill: start over
            shutil.rmtree(courier)
    done = subprocess.run([BIN, "fetch", dest_db, srv.url("src"), courier, "-q"], stdout=subprocess.DEVNULL)
    wrong += wrong_final_files(courier, src)
    complete = done.returncode == 0 and courier_bytes(courier) == total
    srv.stop()
    print("\nkill -9 of fetch: %d rounds, %d kills mid-run, tree of %d bytes, one uninterrupted fetch %.2f s"
          % (ROUNDS, kills, total, full))
    print("files with wrong content at a final path: %d" % wrong)
    print("final courier complete and verified: %s" % ("yes" if complete else "NO"))
    print("bytes served again per interruption: median %d, p90 %d, max %d"
          % (statistics.median(waste), sorted(waste)[int(len(waste) * 0.9)], max(waste)))
    shutil.rmtree(work, ignore_errors=True)


def section_put():
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    mixed_tree(src)
    os.makedirs(dst)
    conf = os.path.join(work, "c.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' % (src, dst))
    log = os.path.join(work, "serve.log")
    srv = Server(conf, log)
    db = lambda n: os.path.join(work, n)
    courier = os.path.join(work, "courier")
    run = lambda *a: subprocess.run([BIN] + list(a) + ["-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("emptydb", db("dest.db"))
    run("builddb", srv.url("src"), db("src.db"))
    run("fetch", db("dest.db"), srv.url("src"), courier)
    t = time.time()
    run("store", db("src.db"), srv.url("dst"), courier)
    full = time.time() - t
    temps_seen = wrong = 0
    for i in range(ROUNDS):
        shutil.rmtree(dst)
        os.makedirs(dst)
        srv.stop()
        srv.start()
        p = popen([BIN, "store", db("src.db"), srv.url("dst"), courier, "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full))
        srv.kill9()
        p.wait()
        srv.start()
        time.sleep(0.2)  # startup cleaning runs in the background
        for path in snapshot(dst):
            rel = os.path.relpath(path, dst)
            if ".bitfog-tmp" in rel:
                temps_seen += 1
            elif os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as a, open(os.path.join(src, rel), "rb") as b:
                    if a.read() != b.read():
                        wrong += 1
        listing, _ = exchange(srv.addr, request("GET", "/dst/"), timeout=30)
        if b".bitfog" in listing:
            temps_seen += 1
    result = run("store", db("src.db"), srv.url("dst"), courier)
    equal = snapshot(src).values() and sorted(snapshot(src).values()) == sorted(snapshot(dst).values())
    srv.stop()
    print("\nkill -9 of the server during store: %d rounds (one store takes %.2f s)" % (ROUNDS, full))
    print("partial or temporary files visible after restart: %d" % temps_seen)
    print("files with wrong content at a final path: %d" % wrong)
    print("destination equals the source after a final store: %s" % ("yes" if result.returncode == 0 and equal else "NO"))
    shutil.rmtree(work, ignore_errors=True)


def http_once(addr, method, path, headers=(), body=b"", timeout=30):
    """One request with Connection: close; returns (status, body)."""
    out, hung = exchange(addr, request(method, path, headers, body), timeout=timeout)
    if hung or b"\r\n\r\n" not in out:
        raise OSError("no answer")
    head, _, rest = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body_out, buf = b"", rest
        while True:
            line, _, buf = buf.partition(b"\r\n")
            n = int(line, 16)
            if n == 0:
                break
            body_out, buf = body_out + buf[:n], buf[n + 2:]
        rest = body_out
    return status, rest


def section_load():
    import threading
    seconds = int(os.environ.get("LOAD_SECONDS", "60"))
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    files = {}
    for i in range(40):
        data = os.urandom(rng.choice([1000, 50000, 1 << 20, 3 << 20]))
        files["f%02d" % i] = data
        write(os.path.join(src, "f%02d" % i), data)
    os.makedirs(dst)
    conf = os.path.join(work, "c.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' % (src, dst))
    srv = Server(conf, os.path.join(work, "serve.log"), threads=16)
    idle = [socket.create_connection(srv.addr) for _ in range(500)]
    stop = time.time() + seconds
    counts = {"list": 0, "range": 0, "put": 0, "errors": 0, "corrupt": 0}
    lock = threading.Lock()

    def client(k):
        r = random.Random(k)
        n = 0
        while time.time() < stop:
            op = r.choice(["list", "range", "range", "put"])
            try:
                if op == "list":
                    status, body = http_once(srv.addr, "GET", "/src/")
                    lines = [l for l in body.split(b"\n") if l.strip()]
                    end = __import__("json").loads(lines[-1])
                    ok = status == 200 and end.get("end") and end["count"] == len(lines) - 1
                elif op == "range":
                    name = r.choice(sorted(files))
                    data = files[name]
                    a = r.randrange(len(data))
                    b = min(len(data) - 1, a + r.randrange(1 << 20))
                    status, body = http_once(srv.addr, "GET", "/src/" + name, (("Range", "bytes=%d-%d" % (a, b)),))
                    ok = status == 206 and body == data[a:b + 1]
                else:
                    data = os.urandom(r.randrange(1, 256 << 10))
                    name = "/dst/c%d/n%d" % (k, n)
                    n += 1
                    status, _ = http_once(srv.addr, "PUT", name, (("X-Bitfog-Sha256", hashlib.sha256(data).hexdigest()),), data)
                    got_status, got = http_once(srv.addr, "GET", name)
                    ok = status == 204 and got_status == 200 and got == data
                with lock:
                    counts[op] += 1
                    if not ok:
                        counts["corrupt"] += 1
            except (OSError, ValueError, IndexError, KeyError):
                with lock:
                    counts["errors"] += 1

    rss, threads_max = 0, 0
    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(64)]
    for w in workers:
        w.start()
    while time.time() < stop:
        with open("/proc/%d/status" % srv.proc.pid) as f:
            st = f.read()
        rss = max(rss, int(st.split("VmRSS:")[1].split()[0]))
        threads_max = max(threads_max, int(st.split("Threads:")[1].split()[0]))
        time.sleep(1)
    for w in workers:
        w.join()
    alive = srv.alive() and healthy(srv.addr)
    for s_ in idle:
        s_.close()
    srv.stop()
    total = counts["list"] + counts["range"] + counts["put"]
    print("\nload: 64 clients for %d s with 500 idle connections open (--threads 16)" % seconds)
    print("operations: %d (%d listings, %d ranges, %d PUT+GET), %.0f/s"
          % (total, counts["list"], counts["range"], counts["put"], total / seconds))
    print("errors: %d, corrupt bodies: %d, server alive and answering: %s"
          % (counts["errors"], counts["corrupt"], "yes" if alive else "NO"))
    print("server peak RSS: %.1f MiB, peak threads: %d" % (rss / 1024, threads_max))
    shutil.rmtree(work, ignore_errors=True)


def section_inject():
    """Injected I/O errors with strace: every run ends in exit 0, 1 or 2 with
    the invariants intact, and a clean rerun completes."""
    if not shutil.which("strace"):
        print("\ninject: skipped (strace missing; apt-get install strace)")
        return
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    for i in range(12):
        write(os.path.join(src, "d%d" % (i % 3), "f%d" % i), os.urandom(rng.choice([0, 100, 70000, 2 << 20])))
    os.makedirs(dst)
    conf = os.path.join(work, "c.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' % (src, dst))
    log = os.path.join(work, "serve.log")
    srv = Server(conf, log)
    db = lambda n: os.path.join(work, n)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([BIN, "emptydb", db("dest.db")], check=True, **quiet)
    subprocess.run([BIN, "builddb", srv.url("src"), db("src.db")], check=True, **quiet)
    runs, bad_exit, wrong, unfinished = 0, 0, 0, 0

    def loader_calls(call):
        """Calls the dynamic loader makes before main: injecting there tests
        ld.so, not bitfog, so injection points start after them."""
        out = subprocess.run(["strace", "-f", "-c", "-e", "trace=" + call, BIN, "--version"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[-1] == call:
                return int(parts[3])
        return 0

    def shift(call, when):
        n = loader_calls(call)
        return str(int(when.rstrip("+")) + n) + ("+" if when.endswith("+") else "")
    codes = {}
    calls = ["write", "pwrite64", "fsync", "fdatasync", "rename", "openat", "read", "mkdir", "ftruncate"]
    for call in calls:
        for when in ["1", "3", "10", "40", "3+"]:
            courier = db("courier")
            shutil.rmtree(courier, ignore_errors=True)
            err = "ENOSPC" if call in ("write", "pwrite64") and when.endswith("+") else "EIO"
            p = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "trace=" + call,
                                "-e", "inject=%s:error=%s:when=%s" % (call, err, shift(call, when)),
                                BIN, "fetch", db("dest.db"), srv.url("src"), courier, "-q"], **quiet)
            runs += 1
            codes[p.returncode] = codes.get(p.returncode, 0) + 1
            if p.returncode not in (0, 1, 2):
                bad_exit += 1
                print("  fetch with %s failing (%s) exited %d" % (call, when, p.returncode))
            if os.path.isdir(courier):
                wrong += wrong_final_files(courier, src)
            again = subprocess.run([BIN, "fetch", db("dest.db"), srv.url("src"), courier, "-q"], **quiet)
            if again.returncode != 0 or wrong_final_files(courier, src) or courier_bytes(courier) != sum(
                    os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(src) for f in fs):
                unfinished += 1
                print("  fetch did not complete after %s failed (%s)" % (call, when))
    # The server under injection while store uploads.
    srv.stop()
    server_runs = server_bad = temps = 0
    for call in ["write", "fsync", "rename", "openat", "mkdir", "fchmod", "utimensat"]:
        for when in ["1", "5", "2+"]:
            shutil.rmtree(dst)
            os.makedirs(dst)
            logf = open(log, "ab")
            start = logf.tell()
            proc = popen(["strace", "-f", "-o", "/dev/null", "-e", "trace=" + call,
                                     "-e", "inject=%s:error=EIO:when=%s" % (call, shift(call, when)), BIN, "serve", "--conf", conf,
                                     "--addr", "127.0.0.1:0", "--cache", "none"], stdout=subprocess.DEVNULL, stderr=logf,
                                    start_new_session=True)
            addr = None
            for _ in range(500):
                with open(log, "rb") as f:
                    f.seek(start)
                    m = [l for l in f.read().decode(errors="replace").splitlines(True)
                         if l.startswith("bitfog: listening on") and l.endswith("\n")]
                if m or proc.poll() is not None:
                    break
                time.sleep(0.01)
            server_runs += 1
            if m:
                url = m[0].strip().split("listening on ")[1] + "dst/"
                subprocess.run([BIN, "store", db("src.db"), url, db("courier"), "-q"], **quiet)
            # Killing strace alone would leave its traced server running.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the injected server already exited
            proc.wait()
            if proc.returncode not in (0, 1, 2, -9):
                server_bad += 1
                print("  serve with %s failing (%s) exited %d" % (call, when, proc.returncode))
            for path in snapshot(dst):
                if ".bitfog-tmp" in path:
                    temps += 1
                elif os.path.isfile(path):
                    rel = os.path.relpath(path, dst)
                    with open(path, "rb") as a, open(os.path.join(src, rel), "rb") as b:
                        if a.read() != b.read():
                            wrong += 1
                            print("  WRONG CONTENT at the destination: %s" % rel)
    # Temporary files left by killed injected servers are cleaned at the
    # next start; what matters is that none is ever visible.
    srv = Server(conf, log)
    time.sleep(0.3)
    listing, _ = exchange(srv.addr, request("GET", "/dst/"))
    visible = listing.count(b".bitfog")
    final = subprocess.run([BIN, "store", db("src.db"), srv.url("dst"), db("courier"), "-q"], **quiet)
    equal = final.returncode == 0 and sorted(snapshot(src).values()) == sorted(snapshot(dst).values())
    srv.stop()
    print("\ninjected I/O errors (strace -e inject)")
    print("fetch: %d runs over %s; exit codes %s; other exits: %d" % (runs, ",".join(calls), dict(sorted(codes.items())), bad_exit))
    print("files with wrong content at a final path: %d; reruns that did not complete: %d" % (wrong, unfinished))
    print("serve during store: %d runs; abnormal exits: %d; temporary files left by killed servers: %d, visible in a listing: %d"
          % (server_runs, server_bad, temps, visible))
    print("destination equals the source after a clean store: %s" % ("yes" if equal else "NO"))
    shutil.rmtree(work, ignore_errors=True)


def section_disk():
    """A full courier disk and a full destination area (tmpfs; needs root)."""
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst, courier = (os.path.join(work, d) for d in ("src", "dst", "courier"))
    total = 0
    for i in range(20):
        n = rng.choice([10000, 300000, 1 << 20, 3 << 20])
        total += n
        write(os.path.join(src, "f%02d" % i), os.urandom(n))
    for d in (dst, courier):
        os.makedirs(d)
    mounted = []
    for d, size in ((courier, "8M"), (dst, "6M")):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", d], stderr=subprocess.DEVNULL).returncode:
            print("\ndisk: skipped (cannot mount tmpfs; needs root)")
            return
        mounted.append(d)
    try:
        conf = os.path.join(work, "c.json")
        with open(conf, "w") as f:
            f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' % (src, dst))
        log = os.path.join(work, "serve.log")
        srv = Server(conf, log)
        db = lambda n: os.path.join(work, n)
        subprocess.run([BIN, "emptydb", db("dest.db")], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([BIN, "builddb", srv.url("src"), db("src.db")], check=True, stdout=subprocess.DEVNULL)
        f = subprocess.run([BIN, "fetch", db("dest.db"), srv.url("src"), courier, "--json"], capture_output=True, text=True)
        summary = __import__("json").loads(f.stdout)
        disk_lines = [l for l in f.stderr.splitlines() if "full" in l]
        wrong = wrong_final_files(courier, src)
        s1 = subprocess.run([BIN, "store", db("src.db"), srv.url("dst"), courier, "--json"], capture_output=True, text=True)
        stored = __import__("json").loads(s1.stdout)
        with open(log) as lf:
            put507 = sum(1 for l in lf if '"PUT /dst/' in l and l.split()[-2] == "507")
        temps = sum(1 for p in snapshot(dst) if ".bitfog-tmp" in p)
        for p in snapshot(dst):
            if os.path.isfile(p):
                with open(p, "rb") as a, open(os.path.join(src, os.path.relpath(p, dst)), "rb") as b:
                    wrong += a.read() != b.read()
        # Free space: a larger destination, then trips until done.
        subprocess.run(["mount", "-o", "remount,size=128M", dst], check=True)
        trips = 1
        for _ in range(10):
            subprocess.run([BIN, "store", db("src.db"), srv.url("dst"), courier, "-q"], stdout=subprocess.DEVNULL)
            subprocess.run([BIN, "builddb", srv.url("dst"), db("dest.db"), "-q"], stdout=subprocess.DEVNULL)
            plan = subprocess.run([BIN, "plan", db("dest.db"), srv.url("src"), "--json"], capture_output=True, text=True)
            if __import__("json").loads(plan.stdout)["remaining_files"] == 0:
                break
            subprocess.run([BIN, "fetch", db("dest.db"), srv.url("src"), courier, "-q"], stdout=subprocess.DEVNULL)
            trips += 1
        equal = sorted(snapshot(src).values()) == sorted(v for k, v in snapshot(dst).items() if ".bitfog" not in k)
        srv.stop()
        print("\nfull disks: %d bytes of source, an 8 MiB courier and a 6 MiB destination (tmpfs)" % total)
        print("fetch: exit %d, disk_full %s, %d lines about the full disk, %d files kept, %d left"
              % (f.returncode, summary["disk_full"], len(disk_lines), summary["fetched_files"], summary["remaining_files"]))
        print("store: exit %d, %d stored, %d failed, %d PUTs answered 507, temporary files left: %d"
              % (s1.returncode, stored["stored_files"], stored["failed_files"], put507, temps))
        print("files with wrong content at a final path: %d" % wrong)
        print("after freeing space: complete in %d trips, destination equals the source: %s" % (trips, "yes" if equal else "NO"))
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", d])
        shutil.rmtree(work, ignore_errors=True)


def delta_sound(path):
    """A delta in the courier is whole: its last 32 bytes are the SHA-256
    of everything before them, after an 'E'."""
    with open(path, "rb") as f:
        data = f.read()
    return len(data) > 33 and data[-33:-32] == b"E" and hashlib.sha256(data[:-32]).digest() == data[-32:]


def section_delta():
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    r = random.Random(6)
    old = r.randbytes(64 << 20)
    new = bytearray(old)
    for _ in range(6):
        at = r.randrange(0, len(new) - 200_000)
        new[at:at + 100_000] = r.randbytes(100_000)
    new[len(new) // 2:len(new) // 2] = r.randbytes(4096)
    new = bytes(new)
    write(os.path.join(src, "vm.img"), new)
    write(os.path.join(dst, "vm.img"), old)
    good = {hashlib.sha256(old).hexdigest(): "old", hashlib.sha256(new).hexdigest(): "new"}
    conf = os.path.join(work, "c.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' % (src, dst))
    srv = Server(conf, os.path.join(work, "serve.log"))
    db = lambda n: os.path.join(work, n)
    courier = os.path.join(work, "courier")
    deltas = os.path.join(courier, ".bitfog", "deltas")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([BIN, "builddb", srv.url("dst"), db("dest.db"), "--signatures", "--signature-min", "1M", "-q"],
                   check=True, **quiet)
    subprocess.run([BIN, "builddb", srv.url("src"), db("src.db"), "-q"], check=True, **quiet)
    fetch = [BIN, "fetch", db("dest.db"), srv.url("src"), courier, "-q"]
    t = time.time()
    subprocess.run(fetch, check=True, **quiet)
    full_fetch = time.time() - t
    # kill -9 of fetch while it makes the delta.
    kills = unsound = complete = 0
    for _ in range(ROUNDS):
        shutil.rmtree(courier, ignore_errors=True)
        p = popen(fetch, **quiet)
        time.sleep(rng.uniform(0, full_fetch * 1.3))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.wait()
        for n in os.listdir(deltas) if os.path.isdir(deltas) else []:
            if n.endswith(".delta"):
                complete += 1
                unsound += not delta_sound(os.path.join(deltas, n))
    fetched = subprocess.run(fetch + ["--json"], capture_output=True, text=True)
    made = __import__("json").loads(fetched.stdout)
    # kill -9 of the server while it patches.
    # The server's port changes with each start.
    store = lambda: [BIN, "store", db("src.db"), srv.url("dst"), courier, "-q"]
    # Timed as each round runs it: the old version just written back,
    # a fresh server (its caches miss the rewritten file).
    write(os.path.join(dst, "vm.img"), old)
    srv.stop()
    srv.start()
    t = time.time()
    subprocess.run(store(), check=True, **quiet)
    full_store = time.time() - t
    outcomes = {"old": 0, "new": 0}
    wrong = temps = 0
    for _ in range(ROUNDS):
        write(os.path.join(dst, "vm.img"), old)
        srv.stop()
        srv.start()
        p = popen(store(), **quiet)
        time.sleep(rng.uniform(0, full_store * 1.5))
        srv.kill9()
        p.wait()
        srv.start()
        time.sleep(0.2)  # startup cleaning runs in the background
        with open(os.path.join(dst, "vm.img"), "rb") as f:
            state = good.get(hashlib.sha256(f.read()).hexdigest())
        if state:
            outcomes[state] += 1
        else:
            wrong += 1
        temps += sum(".bitfog" in n for n in os.listdir(dst))
    write(os.path.join(dst, "vm.img"), old)
    final = subprocess.run(store(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if final.returncode != 0:
        print(final.stderr)
    with open(os.path.join(dst, "vm.img"), "rb") as f:
        equal = f.read() == new
    srv.stop()
    print("\ndeltas: a 64 MiB file, 600 KB overwritten and 4 KiB inserted; delta %d bytes" % made["delta_bytes"])
    print("kill -9 of fetch while it makes the delta: %d rounds (one fetch %.2f s), %d kills mid-run"
          % (ROUNDS, full_fetch, kills))
    print("complete deltas left by killed or finished runs: %d, of them damaged: %d; the final fetch: exit %d, %d delta"
          % (complete, unsound, fetched.returncode, made["delta_files"]))
    print("kill -9 of the server while it patches: %d rounds (one store %.2f s)" % (ROUNDS, full_store))
    print("destination file afterwards: old version %d, new version %d, anything else %d; temporary files visible: %d"
          % (outcomes["old"], outcomes["new"], wrong, temps))
    print("after a final store the file is the new version: %s" % ("yes" if final.returncode == 0 and equal else "NO"))
    shutil.rmtree(work, ignore_errors=True)


def run_bounded(args, timeout=60):
    """Runs bitfog; returns (exit code, hung). A run past `timeout` is
    killed and counts as hung."""
    p = popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = p.communicate(timeout=timeout)
        return p.returncode, False, err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return -9, True, ""


def sites(work, extra_src=""):
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(src, exist_ok=True)
    os.makedirs(dst, exist_ok=True)
    conf = os.path.join(work, "c.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"%s},"dst":{"path":"%s","writable":true}}' % (src, extra_src, dst))
    return src, dst, conf


def trees_equal(a, b):
    strip = lambda snap, root: {os.path.relpath(k, root): v for k, v in snap.items()}
    return strip(snapshot(a), a) == strip(snapshot(b), b)


def section_courier():
    """A courier prepared by someone else: each round plants a random mix
    of symlinks (at state paths, state directories and above carried
    names, all pointing outside), FIFOs and crafted records, then runs
    fetch and store. Nothing outside may change and nothing may hang."""
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst, conf = sites(work)
    for i in range(12):
        write(os.path.join(src, "d%d" % (i % 3), "f%02d" % i), os.urandom(rng.randrange(1, 3 << 20)))
    outside = os.path.join(work, "outside")
    srv = Server(conf, os.path.join(work, "serve.log"))
    dest_db, src_db = os.path.join(work, "dest.db"), os.path.join(work, "src.db")
    subprocess.run([BIN, "emptydb", dest_db], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([BIN, "builddb", srv.url("src"), src_db], check=True, stdout=subprocess.DEVNULL)
    state_files = ["wanted.tmp", "held.tmp", "destdb.jsonl.tmp", "destdb.jsonl", "carried.jsonl.tmp",
                   "carried.jsonl", "copies.jsonl.tmp", "copies.jsonl.new", "copies.jsonl", "store.tmp",
                   "receipt.tmp", "receipt.jsonl", "lock", "partial/x.json", "partial/x.part",
                   "partial/x.json.tmp", "ranges/r.json", "ranges/r.range", "deltas/x.delta"]
    state_dirs = ["partial", "ranges", "deltas"]
    crafted = [
        '{"name":"../../outside/v0","size":1,"mtime":1,"sha256":null}',
        '{"name":"/etc/passwd","size":1,"mtime":1,"sha256":null}',
        '{"name":"up/v0","size":12,"mtime":1,"sha256":null}',
        '{"name":".bitfog/lock","size":0,"mtime":1,"sha256":null}',
        '{"name":"x","size":18446744073709551615,"mtime":-1}',
        '{"name":"' + "a/" * 3000 + 'b","size":1,"mtime":1,"sha256":null}',
        "x" * 200000,
    ]
    planted = {"symlink": 0, "dir-symlink": 0, "parent-symlink": 0, "fifo": 0, "record": 0}
    changed = hangs = crashes = rounds_ok = 0
    for r in range(ROUNDS):
        shutil.rmtree(outside, ignore_errors=True)
        for i in range(4):
            write(os.path.join(outside, "v%d" % i), b"precious %d" % i)
        courier = os.path.join(work, "courier")
        shutil.rmtree(courier, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        budget = rng.choice(["1M", "4M", "16M"])
        subprocess.run([BIN, "fetch", dest_db, srv.url("src"), courier, "--max-bytes", budget, "-q"],
                       stdout=subprocess.DEVNULL)
        state = os.path.join(courier, ".bitfog")
        for _ in range(rng.randrange(1, 8)):
            kind = rng.choice(list(planted))
            target = os.path.join(outside, "v%d" % rng.randrange(4))
            try:
                if kind == "symlink":
                    p = os.path.join(state, rng.choice(state_files))
                elif kind == "dir-symlink":
                    p, target = os.path.join(state, rng.choice(state_dirs)), outside
                elif kind == "parent-symlink":
                    p, target = os.path.join(courier, rng.choice(["d0", "d1", "d2", "up"])), outside
                elif kind == "fifo":
                    p = rng.choice([os.path.join(state, rng.choice(state_files)),
                                    os.path.join(courier, "d%d" % rng.randrange(3), "f%02d" % rng.randrange(12))])
                else:
                    p = os.path.join(state, rng.choice(["carried.jsonl", "copies.jsonl"]))
                os.makedirs(os.path.dirname(p), exist_ok=True)
                if kind == "record":
                    # Only into the record itself: never through something
                    # planted there earlier in the round.
                    if os.path.isfile(p) and not os.path.islink(p):
                        with open(p, "a") as f:
                            f.write(rng.choice(crafted) + "\n")
                else:
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p)
                    elif os.path.lexists(p):
                        os.unlink(p)
                    if kind == "fifo":
                        os.mkfifo(p)
                    else:
                        os.symlink(target, p)
                planted[kind] += 1
            except OSError:
                pass
        before = snapshot(outside)
        codes = []
        for args in ([BIN, "fetch", dest_db, srv.url("src"), courier, "-q"],
                     [BIN, "store", src_db, srv.url("dst"), courier, "--delete", "-q"],
                     [BIN, "fetch", courier, srv.url("src"), courier, "-q"],
                     [BIN, "fetch", dest_db, srv.url("src"), courier, "--dry-run", "-q"]):
            code, hung, err = run_bounded(args)
            codes.append(code)
            hangs += hung
            if code not in (0, 1, 2) and not hung:
                crashes += 1
                print("  CRASH (exit %d): %s\n%s" % (code, " ".join(args[1:2]), err[-2000:]))
        if snapshot(outside) != before:
            changed += 1
            print("  OUTSIDE CHANGED in round %d" % r)
        # The courier can always be brought back to a good trip.
        shutil.rmtree(courier, ignore_errors=True)
        rounds_ok += 1
    # Control: the detector sees a change outside.
    before = snapshot(outside)
    write(os.path.join(outside, "v0"), b"changed")
    control = snapshot(outside) != before
    srv.stop()
    print("\nhostile couriers: %d rounds, planted: %s" % (ROUNDS, ", ".join("%s %d" % kv for kv in planted.items())))
    print("rounds in which anything outside the courier changed: %d (control detects a change: %s)"
          % (changed, "yes" if control else "NO"))
    print("runs that hung (over 60 s): %d; crashed (exit other than 0/1/2): %d" % (hangs, crashes))
    shutil.rmtree(work, ignore_errors=True)


def section_unreadable():
    """Directories the server cannot read: every one is counted in
    `skipped`, and store --delete then deletes nothing. Needs root (the
    server runs as nobody)."""
    if os.geteuid() != 0:
        print("\nunreadable: needs root (the server runs as nobody); not run")
        return
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    os.chmod(work, 0o755)
    src, dst, conf = sites(work)
    made = counted = deleted = lost = wrong_count = 0
    for r in range(ROUNDS):
        for d in (src, dst):
            subprocess.run(["chmod", "-R", "u+rwx", d])
            shutil.rmtree(d)
            os.makedirs(d)
        for i in range(rng.randrange(3, 12)):
            rel = os.path.join(*["d%d" % rng.randrange(3) for _ in range(rng.randrange(1, 4))], "f%d" % i)
            write(os.path.join(src, rel), b"x" * i)
            write(os.path.join(dst, rel), b"x" * i)
        write(os.path.join(dst, "only-at-dest"), b"extra")
        dirs = sorted({os.path.dirname(os.path.join(dp, n)) for dp, _, fs in os.walk(src) for n in fs})
        dirs = [d for d in dirs if d != src]
        locked = rng.sample(dirs, rng.randrange(1, len(dirs) + 1)) if dirs else []
        # A locked directory below a locked one is not reached at all.
        locked = [d for d in locked if not any(d != o and d.startswith(o + "/") for o in locked)]
        for d in (src, dst):
            subprocess.run(["chmod", "-R", "a+rwX", d])
        for d in locked:
            os.chmod(d, 0)
        made += len(locked)
        before = snapshot(dst)
        srv = popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", BIN, "serve",
                                "--conf", conf, "--addr", "127.0.0.1:0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = srv.stderr.readline().decode()
        url = line.strip().split("listening on ")[1]
        db = os.path.join(work, "src.db")
        out = subprocess.run([BIN, "builddb", url + "src/", db, "--json", "-q"], capture_output=True, text=True)
        import json
        skipped = json.loads(out.stdout)["skipped"]
        counted += skipped
        wrong_count += skipped != len(locked)
        # An empty courier: nothing to upload, only deletions to judge.
        courier = os.path.join(work, "courier")
        os.makedirs(os.path.join(courier, ".bitfog"), exist_ok=True)
        st = subprocess.run([BIN, "store", db, url + "dst/", courier, "--delete", "--json", "-q"],
                            capture_output=True, text=True)
        # A refusal (a DB that lists nothing) is a JSON error: nothing deleted.
        deleted += json.loads(st.stdout).get("deleted_files", 0) if st.stdout else 0
        after = snapshot(dst)
        lost += sum(1 for k in before if k not in after)
        srv.terminate()
        srv.wait()
    print("\nunreadable source directories: %d rounds, %d directories locked (mode 000, server as nobody)" % (ROUNDS, made))
    print("skipped counted by the listings: %d; listings whose count was wrong: %d" % (counted, wrong_count))
    print("files store --delete deleted at the destination: %d; files lost there: %d" % (deleted, lost))
    subprocess.run(["chmod", "-R", "u+rwx", work])
    shutil.rmtree(work, ignore_errors=True)


def section_record():
    """Thousands of empty directories with long names, made over HTTP:
    the end record stays within what clients accept."""
    import json
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst, conf = sites(work)
    srv = Server(conf, os.path.join(work, "serve.log"))
    long = "/".join("%02d%s" % (i, "x" * 253) for i in range(15))
    n = 4500
    t = time.time()
    sent = 0
    s = socket.create_connection(srv.addr)
    for i in range(n):
        req = ("PUT /dst/d%04d/%s HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-bitfog-directory\r\n"
               "Content-Length: 0\r\n\r\n" % (i, long)).encode()
        s.sendall(req)
        sent += len(req)
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += s.recv(4096)
    s.close()
    traffic = time.time() - t
    db = os.path.join(work, "dst.db")
    t = time.time()
    out = subprocess.run([BIN, "builddb", srv.url("dst"), db, "--json"], capture_output=True, text=True)
    listing = time.time() - t
    with open(db) as f:
        end = f.read().splitlines()[-1] if out.returncode == 0 else "{}"
    e = json.loads(end)
    srv.stop()
    print("\noversized end record: %d directory PUTs with %d-byte names, %d bytes sent in %.1f s"
          % (n, len(long) + 6, sent, traffic))
    print("builddb: exit %d in %.1f s; end record %d bytes (clients accept %d); %d directories named, %d counted in dirs_omitted"
          % (out.returncode, listing, len(end), 16 << 20, len(e.get("dirs", [])), e.get("dirs_omitted", 0)))
    shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def section_cpu():
    """Requests that are small on the wire and ask for much work: the
    server CPU each costs, measured from /proc, during and after it."""
    work = tempfile.mkdtemp(prefix="bitfog-torture-")
    src, dst, conf = sites(work)
    with open(os.path.join(src, "huge.img"), "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes
    srv = Server(conf, os.path.join(work, "serve.log"))
    rows = []

    def measure(name, raw, linger=0.0):
        before = cpu_seconds(srv.proc.pid)
        t = time.time()
        s = socket.create_connection(srv.addr, timeout=120)
        s.sendall(raw)
        status = b""
        try:
            status = s.recv(64)
            if linger:
                time.sleep(linger)
        except socket.timeout:
            pass
        s.close()
        answered = time.time() - t
        time.sleep(25)  # what it goes on doing after the client left
        rows.append((name, len(raw), status.split(b"\r\n")[0].decode(errors="replace"), answered,
                     cpu_seconds(srv.proc.pid) - before))

    zero = "0" * 64
    measure("sparse PUT declaring 16 TiB, empty body",
            request("PUT", "/dst/a", [("Content-Type", "application/x-bitfog-extents"),
                                      ("X-Bitfog-Size", "17592186040320"), ("X-Bitfog-Sha256", zero)]))
    body = (0).to_bytes(8, "big") + (4096).to_bytes(8, "big") + b"\0" * 4096
    at_cap = (1 << 30) + 4096 * 4112 + 4112
    measure("sparse PUT at the cap (1 GiB + 4096 x data)",
            request("PUT", "/dst/b", [("Content-Type", "application/x-bitfog-extents"),
                                      ("X-Bitfog-Size", str(at_cap)), ("X-Bitfog-Sha256", zero)], body))
    measure("listing of a 64 GiB sparse file, client gone after 1 s",
            request("GET", "/src/"), linger=1.0)
    measure("signature of a 64 GiB sparse file, client gone after 1 s",
            request("GET", "/src/huge.img?signature"), linger=1.0)
    srv.stop()
    print("\nCPU without traffic (server CPU seconds, including 25 s after the client left):")
    print("%-58s %10s %-28s %8s %8s" % ("request", "bytes", "answer", "wall s", "CPU s"))
    for r in rows:
        print("%-58s %10d %-28s %8.2f %8.2f" % r)
    shutil.rmtree(work, ignore_errors=True)


for s in SECTIONS:
    {"requests": section_requests, "fetch": section_fetch, "put": section_put, "load": section_load,
     "inject": section_inject, "disk": section_disk, "delta": section_delta, "courier": section_courier,
     "unreadable": section_unreadable, "record": section_record, "cpu": section_cpu}[s]()
