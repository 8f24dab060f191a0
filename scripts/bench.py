#!/usr/bin/env python3
"""bitfog against its peers, side by side, in one run. Run by scripts/bench.sh.

Usage: bench.py BITFOG [--quick] [--runs N]

Generates deterministic data (fixed seeds) in a temporary directory, starts
bitfog serve, nginx (sendfile), an rsync daemon and rclone serve http/webdav
on 127.0.0.1, and times each workload in alternating runs (bitfog, peer 1,
peer 2, ..., bitfog, ...), each after deleting its output, syncing and
settling for the same time. Prints medians and bitfog/peer ratios against
the goals of the performance issue. --quick uses small data to check the
script itself.
"""

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

BIN = sys.argv[1]
QUICK = "--quick" in sys.argv
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
# --only delta: just the delta section; --only ssh: just ssh:// against
# rsync -e ssh; --only disks: fetch onto exFAT, FAT32 and NTFS couriers
# (FUSE, loop devices, root) against a plain copy onto the same filesystem;
# --only crypt: an encrypted courier's fetch and store against a plain one;
# --only goals: the performance issue's goal table against rsync, curl -o
# from bitfog serve and find (runs on the 16-core machine too).
ONLY = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
# The delta workload: a file of DELTA_SIZE with 1 % overwritten in six
# places, 4 KiB inserted near the end and 4 KiB deleted after that.
DELTA_SIZE = (64 << 20) if QUICK else (1 << 30)
SETTLE = 1.0 if QUICK else 2.0
BIG = (256 << 20) if QUICK else (2 << 30)
SMALL = 5000 if QUICK else 50000
TINY = 30000 if QUICK else 300000
MILLION = 100000 if QUICK else 1000000
# A sparse image: SPARSE bytes long, SPARSE_DATA of them data.
SPARSE = (1 << 30) if QUICK else (8 << 30)
SPARSE_DATA = (64 << 20) if QUICK else (512 << 20)
# Over ssh: one SSH_BIG file, SSH_SMALL files of 1-64 KiB.
SSH_BIG = (128 << 20) if QUICK else (1 << 30)
SSH_SMALL = 1000 if QUICK else 5000

work = tempfile.mkdtemp(prefix="bitfog-bench-", dir=os.environ.get("BENCH_DIR"))
os.chmod(work, 0o755)
data, dest = os.path.join(work, "data"), os.path.join(work, "dest")
procs = []


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit("nothing listens on %d" % port)


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def serve_bitfog(conf, log, cache):
    """Starts `bitfog serve`; returns the process and its base URL."""
    p = subprocess.Popen([BIN, "serve", "--conf", conf, "--addr", "127.0.0.1:0", "-q", "--cache", cache],
                         stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    procs.append(p)
    for _ in range(500):
        line = open(log).readline()
        if line.endswith("\n"):
            break
        time.sleep(0.01)
    return p, line.strip().split("listening on ")[1]


def make_data():
    t = time.time()
    os.makedirs(os.path.join(data, "big"))
    # A deterministic keystream: AES-CTR over zeros with a fixed key.
    sh("openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv 0 -in /dev/zero 2>/dev/null"
       " | head -c %d > %s" % (BIG, os.path.join(data, "big", "image.bin")))
    r = random.Random(1)
    for i in range(SMALL):
        d = os.path.join(data, "small", "d%02d" % (i % 50), "e%d" % (i % 7))
        if i < 350:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(r.randbytes(r.randint(1024, 65536)))
    r = random.Random(2)
    for i in range(TINY):
        d = os.path.join(data, "tiny", "a%03d" % (i % 300), "b%d" % (i // 300 % 10))
        if i < 3000:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "t%06d" % i), "wb") as f:
            f.write(r.randbytes(r.randint(0, 100)))
    # The sparse image: 64 data extents spread evenly; and a plain file of
    # the same data size, for the time goal.
    os.makedirs(os.path.join(data, "sparse"))
    os.makedirs(os.path.join(data, "plain"))
    chunk = SPARSE_DATA // 64
    with open(os.path.join(data, "big", "image.bin"), "rb") as src, \
            open(os.path.join(data, "sparse", "vm.img"), "wb") as img, \
            open(os.path.join(data, "plain", "data.bin"), "wb") as plain:
        img.truncate(SPARSE)
        for k in range(64):
            piece = src.read(chunk)
            img.seek(k * (SPARSE // 64) + (1 << 20))
            img.write(piece)
            plain.write(piece)
    os.makedirs(dest)
    sh("sync")
    print("data: one %d MiB file, %d files of 1-64 KiB, %d tiny files (%.0f s to make)"
          % (BIG >> 20, SMALL, TINY, time.time() - t), flush=True)


def bitfog_servers():
    conf = os.path.join(work, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"big":{"path":"%s/big"},"small":{"path":"%s/small"},"tiny":{"path":"%s/tiny"},'
                '"tinyfast":{"path":"%s/tiny","checksum":false},"dest":{"path":"%s","writable":true},'
                '"sparse":{"path":"%s/sparse"},"plain":{"path":"%s/plain"}}'
                % (data, data, data, data, dest, data, data))
    urls = {}
    for name, cache in (("main", os.path.join(work, "hashcache")), ("nocache", "none")):
        _, urls[name] = serve_bitfog(conf, os.path.join(work, "serve-%s.log" % name), cache)
    return urls


def peer_servers():
    ports = {}
    ports["nginx"] = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write("""user root; daemon off; worker_processes 2; pid %s/nginx.pid; error_log %s/nginx.err;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  server { listen 127.0.0.1:%d; root %s; } }
""" % (work, work, ports["nginx"], data))
    start(["nginx", "-c", conf])
    ports["rsync"] = free_port()
    rconf = os.path.join(work, "rsyncd.conf")
    with open(rconf, "w") as f:
        f.write("use chroot = no\nuid = root\ngid = root\n[data]\npath = %s\nread only = yes\n[dest]\npath = %s\nread only = no\nuid = root\ngid = root\n"
                % (data, dest))
    start(["rsync", "--daemon", "--no-detach", "--address=127.0.0.1", "--port=%d" % ports["rsync"], "--config=" + rconf])
    ports["rclone_http"] = free_port()
    start(["rclone", "serve", "http", data, "--addr", "127.0.0.1:%d" % ports["rclone_http"], "--read-only"])
    ports["rclone_dav"] = free_port()
    start(["rclone", "serve", "webdav", dest, "--addr", "127.0.0.1:%d" % ports["rclone_dav"]])
    for p in ports.values():
        wait_port(p)
    return ports


def tree_bytes(root):
    total = 0
    for dp, dns, fs in os.walk(root):
        dns[:] = [d for d in dns if d != ".bitfog"]
        total += sum(os.lstat(os.path.join(dp, f)).st_size for f in fs)
    return total


def timed(cmd, before=None, check=None, warm=0):
    """Settles, then times one run of cmd (a shell string). `check` is
    (directory, bytes it must then hold): a run that did not produce
    its whole output is refused, not timed. `warm` bytes are written to a
    scratch file and deleted right before the run: these VMs give memory
    freed for a few seconds back to the host, and writing into it again
    is several times slower, by chance for one contender or another."""
    if before:
        before()
    sh("sync")
    time.sleep(SETTLE)
    if warm:
        scratch = os.path.join(work, "warm.tmp")
        sh("head -c %d /dev/zero > %s && rm %s" % (warm, scratch, scratch))
    t = time.time()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = time.time() - t
    if check and tree_bytes(check[0]) != check[1]:
        print("  incomplete output from: %s (%d of %d bytes)" % (cmd, tree_bytes(check[0]), check[1]), flush=True)
        return None
    return took


def compare(name, contenders, goals, check=None, warm=0):
    """contenders: [(label, cmd, before)], bitfog first. Alternates runs."""
    times = {label: [] for label, _, _ in contenders}
    for _ in range(RUNS):
        for label, cmd, before in contenders:
            times[label].append(timed(cmd, before, check, warm))
    med = {k: (None if None in v else statistics.median(v)) for k, v in times.items()}
    ours = med[contenders[0][0]]
    for label, _, _ in contenders[1:]:
        if ours is None or med[label] is None:
            rows.append((name, ours, label + " (incomplete output)", None, None, "", ""))
            continue
        ratio = ours / med[label]
        goal = goals.get(label)
        verdict = "" if goal is None else ("met" if ratio <= goal else "NOT MET")
        rows.append((name, ours, label, med[label], ratio, "<= %.1fx" % goal if goal else "", verdict))
    if len(contenders) == 1:
        rows.append((name, ours, "", None, None, "", ""))
    print("  %s: %s" % (name, ", ".join("%s %s" % (k, "incomplete" if v is None else "%.2f s" % v)
                                         for k, v in med.items())), flush=True)
    print("    runs: %s" % "; ".join("%s %s" % (k, " ".join("-" if x is None else "%.2f" % x for x in v))
                                    for k, v in times.items()), flush=True)


def rm(*paths):
    def go():
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
            if os.path.exists(p):
                os.remove(p)
    return go


def empty_dest():
    for n in os.listdir(dest):
        p = os.path.join(dest, n)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def peak_rss_kib(cmd):
    """Runs cmd under /usr/bin/time; returns its peak RSS in KiB."""
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, check=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return int(out.stderr.strip().splitlines()[-1])


def memory_section():
    """Peak RSS of serve (while listing), builddb, plan, fetch and store
    over MILLION entries. fetch plans all of them but carries 512 KiB;
    store goes through all of them with that courier."""
    t = time.time()
    root = os.path.join(work, "million")
    per_dir = 1000
    for d in range(MILLION // per_dir):
        p = os.path.join(root, "d%03d" % (d // 100), "e%04d" % d)
        os.makedirs(p)
        for i in range(per_dir):
            with open(os.path.join(p, "file-%05d.dat" % i), "wb") as f:
                f.write(b"%d.%d\n" % (d, i))
    mdest = os.path.join(work, "mdest")
    os.makedirs(mdest)
    print("memory: %d entries (%.0f s to make)" % (MILLION, time.time() - t), flush=True)
    conf = os.path.join(work, "million.json")
    with open(conf, "w") as f:
        f.write('{"m":{"path":"%s"},"dest":{"path":"%s","writable":true}}' % (root, mdest))
    srv, url = serve_bitfog(conf, os.path.join(work, "serve-million.log"), os.path.join(work, "million-cache"))
    mdb, edb, courier = (os.path.join(work, n) for n in ("million.db", "mempty.db", "mcourier"))
    sh([BIN, "emptydb", edb, "-q"])
    got = []
    got.append(("builddb (cold hash cache)", peak_rss_kib([BIN, "builddb", url + "m/", mdb, "-q"]), 128))
    got.append(("builddb (warm hash cache)", peak_rss_kib([BIN, "builddb", url + "m/", mdb, "-q"]), 128))
    for line in open("/proc/%d/status" % srv.pid):
        if line.startswith("VmHWM:"):
            got.insert(0, ("serve, listing (cold and warm)", int(line.split()[1]), 64))
    got.append(("plan", peak_rss_kib([BIN, "plan", edb, url + "m/", "-q"]), 128))
    got.append(("fetch (plans all, carries 512 KiB)",
                peak_rss_kib([BIN, "fetch", edb, url + "m/", courier, "--max-bytes", "512K", "-q"]), 128))
    got.append(("store (SRCDB of all, that courier)",
                peak_rss_kib([BIN, "store", mdb, url + "dest/", courier, "-q"]), 128))
    srv.send_signal(signal.SIGTERM)
    srv.wait(timeout=30)
    return got


def delta_section():
    """A file changed in place and shifted: bitfog's signature, delta and
    patch against rdiff's, rsync --only-write-batch's batch size, and the
    courier and signature bytes."""
    t = time.time()
    root = os.path.join(work, "delta")
    old_dir, new_dir, site = (os.path.join(root, n) for n in ("old", "new", "site"))
    for d in (old_dir, new_dir, site):
        os.makedirs(d)
    old, new = os.path.join(old_dir, "vm.img"), os.path.join(new_dir, "vm.img")
    sh("openssl enc -aes-128-ctr -K 00112233445566778899aabbccddeeff -iv 0 -in /dev/zero 2>/dev/null"
       " | head -c %d > %s" % (DELTA_SIZE, old))
    with open(old, "rb") as f:
        body = bytearray(f.read())
    r = random.Random(6)
    n = len(body)
    piece = n // 100 // 6
    for k in range(6):
        at = r.randrange(k * n // 6, (k + 1) * n // 6 - piece)
        body[at:at + piece] = r.randbytes(piece)
    at = n - n // 20
    body[at:at] = r.randbytes(4096)
    at = n - n // 40
    del body[at:at + 4096]
    with open(new, "wb") as f:
        f.write(body)
    del body
    shutil.copy(old, os.path.join(site, "vm.img"))
    pristine = os.path.join(root, "pristine.img")
    shutil.copy(old, pristine)
    sh("sync")
    print("deltas, a %d MiB file: 1 %% overwritten in six places, 4 KiB in, 4 KiB out (%.0f s to make)"
          % (DELTA_SIZE >> 20, time.time() - t), flush=True)

    conf = os.path.join(root, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"new":{"path":"%s"},"site":{"path":"%s","writable":true}}' % (new_dir, site))
    sigcache = os.path.join(root, "cache")
    srv, url = serve_bitfog(conf, os.path.join(root, "serve.log"), sigcache)
    ddb, sdb, courier = (os.path.join(root, n) for n in ("dest.db", "src.db", "courier"))
    rsig, rdelta, rout = (os.path.join(root, n) for n in ("rdiff.sig", "rdiff.delta", "rdiff.out"))

    def drop_sig_cache():
        # Signatures made afresh; the hash cache stays warm, as at a site
        # that lists its area every trip.
        for n in os.listdir(sigcache) if os.path.isdir(sigcache) else []:
            if n.endswith(".sigs"):
                shutil.rmtree(os.path.join(sigcache, n))

    sh([BIN, "builddb", url + "site/", ddb, "-q"], stdout=subprocess.DEVNULL)
    compare("signature (destination)", [
        ("bitfog", "%s builddb --signatures %ssite/ %s -q" % (BIN, url, ddb), drop_sig_cache),
        ("rdiff signature", "rdiff -f signature %s %s" % (old, rsig), rm(rsig)),
    ], {})
    sh([BIN, "builddb", url + "new/", sdb, "-q"], stdout=subprocess.DEVNULL)
    compare("delta (source)", [
        ("bitfog", "%s fetch %s %snew/ %s -q" % (BIN, ddb, url, courier), rm(courier)),
        ("rdiff signature+delta", "rdiff -f signature %s %s && rdiff -f delta %s %s %s" % (old, rsig, rsig, new, rdelta),
         rm(rsig, rdelta)),
        ("rdiff delta", "rdiff -f delta %s %s %s" % (rsig, new, rdelta), rm(rdelta)),
    ], {"rdiff signature+delta": 1.0})
    sh("rdiff -f signature %s %s && rdiff -f delta %s %s %s" % (old, rsig, rsig, new, rdelta))
    sh([BIN, "fetch", ddb, url + "new/", courier, "-q"], stdout=subprocess.DEVNULL)

    def restore_site():
        # Every contender starts from the same state: the old version back
        # at the site, signed again (the server's cache then knows it, as
        # it would after builddb at a real site), rdiff's output removed.
        # Writing into memory freed seconds before is several times
        # slower on these VMs, so all pay the same for it.
        rm(rout)()
        shutil.copy(pristine, os.path.join(site, "vm.img"))
        sh([BIN, "builddb", "--signatures", url + "site/", os.path.join(root, "again.db"), "-q"], stdout=subprocess.DEVNULL)

    compare("patch (destination)", [
        ("bitfog", "%s store %s %ssite/ %s -q" % (BIN, sdb, url, courier), restore_site),
        ("rdiff patch", "rdiff -f patch %s %s %s" % (old, rdelta, rout), restore_site),
        ("rdiff patch + openssl sha256", "rdiff -f patch %s %s %s && openssl dgst -sha256 %s"
         % (old, rdelta, rout, rout), restore_site),
    ], {"rdiff patch": 1.5}, warm=DELTA_SIZE + (64 << 20))
    restore_site()
    sh("%s store %s %ssite/ %s -q" % (BIN, sdb, url, courier), stdout=subprocess.DEVNULL)
    same = subprocess.run(["cmp", new, os.path.join(site, "vm.img")]).returncode == 0
    print("  the patched file is %s the new one" % ("byte-identical to" if same else "NOT the same as"), flush=True)

    batch = os.path.join(root, "rsync.batch")
    compare("rsync --only-write-batch", [
        ("rsync --only-write-batch", "rsync --ignore-times --no-whole-file --only-write-batch=%s %s %s/" % (batch, new, old_dir),
         rm(batch, batch + ".sh")),
    ], {})
    deltas = os.path.join(courier, ".bitfog", "deltas")
    ours = sum(os.path.getsize(os.path.join(deltas, f)) for f in os.listdir(deltas))
    sig = os.path.getsize(ddb + ".sig")
    sizes.append(("bitfog delta in the courier", ours, "rdiff delta", ours / os.path.getsize(rdelta), 1.1))
    sizes.append(("bitfog delta in the courier", ours, "rsync batch", ours / os.path.getsize(batch), None))
    sizes.append(("rdiff delta", os.path.getsize(rdelta), "", None, None))
    sizes.append(("rsync batch", os.path.getsize(batch), "", None, None))
    sizes.append(("bitfog signature (DB.sig)", sig, "file size", sig / DELTA_SIZE, 0.005))
    sizes.append(("rdiff signature", os.path.getsize(rsig), "file size", os.path.getsize(rsig) / DELTA_SIZE, None))
    sizes.append(("patched file identical to the new one", int(same), "", None, None))
    srv.send_signal(signal.SIGTERM)
    srv.wait(timeout=30)
    shutil.rmtree(root)


def ssh_section():
    """ssh:// URLs against rsync -e ssh, both through a private sshd on
    127.0.0.1 (its own host key and authorized key; nothing of the
    machine's ssh setup is used), with the same ssh options and cipher."""
    import pwd
    root = tempfile.mkdtemp(prefix="ssh-", dir=work)
    big, small, out = (os.path.join(root, n) for n in ("big", "small", "out"))
    os.makedirs(big)
    sh("openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv 0 -in /dev/zero 2>/dev/null"
       " | head -c %d > %s/image.bin" % (SSH_BIG, big))
    r = random.Random(3)
    for i in range(SSH_SMALL):
        d = os.path.join(small, "d%02d" % (i % 20))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(r.randbytes(r.randint(1024, 65536)))
    keys = os.path.join(root, "keys")
    os.makedirs(keys)
    for k in ("host", "id"):
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(keys, k)])
    shutil.copy(os.path.join(keys, "id.pub"), os.path.join(keys, "authorized_keys"))
    with open(os.path.join(keys, "known_hosts"), "w") as f:
        f.write("bench " + open(os.path.join(keys, "host.pub")).read())
    port = free_port()
    with open(os.path.join(keys, "sshd_config"), "w") as f:
        f.write("Port %d\nListenAddress 127.0.0.1\nHostKey %s/host\nAuthorizedKeysFile %s/authorized_keys\n"
                "PidFile %s/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
                "PermitRootLogin prohibit-password\nMaxStartups 100\nMaxSessions 100\n" % (port, keys, keys, keys))
    os.makedirs("/run/sshd", exist_ok=True)
    start(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(keys, "sshd_config")])
    wait_port(port)
    rsh = ("ssh -F /dev/null -i %s/id -o IdentitiesOnly=yes -o BatchMode=yes -o HostKeyAlias=bench"
           " -o UserKnownHostsFile=%s/known_hosts -o GlobalKnownHostsFile=/dev/null -o LogLevel=ERROR" % (keys, keys))
    conf = os.path.join(root, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"big":{"path":"%s"},"small":{"path":"%s"},"dest":{"path":"%s/dest","writable":true}}'
                % (big, small, root))
    os.makedirs(os.path.join(root, "dest"))
    env = "BITFOG_RSH='%s' BITFOG_REMOTE='%s serve --stdio -q --conf %s --cache %s/cache'" % (rsh, BIN, conf, root)
    user = pwd.getpwuid(os.getuid()).pw_name
    url = "ssh://%s@127.0.0.1:%d/" % (user, port)
    edb = os.path.join(root, "empty.db")
    sh([BIN, "emptydb", edb, "-q"])
    cipher = sh("%s -v -p %d %s@127.0.0.1 true 2>&1 | grep -m1 'cipher:' || true"
                % (rsh, port, user), capture_output=True, text=True).stdout.strip()
    print("ssh: %s" % (cipher.split("debug1: ")[-1] or "cipher not reported"), flush=True)
    for area in ("big", "small"):
        # The far end's hash cache is warm, as a site's is.
        sh("%s %s builddb %s%s/ %s/warm.db -q" % (env, BIN, url, area, root))
    for area, n in (("big", "one %d MiB file" % (SSH_BIG >> 20)), ("small", "%d files of 1-64 KiB" % SSH_SMALL)):
        print("over ssh, fetch %s" % n, flush=True)
        compare("ssh fetch " + area, [
            ("bitfog", "%s %s fetch %s %s%s/ %s -q" % (env, BIN, edb, url, area, out), rm(out)),
            ("rsync -e ssh", "rsync -a -e '%s -p %d' %s@127.0.0.1:%s/ %s/" % (rsh, port, user, os.path.join(root, area), out), rm(out)),
        ], {"rsync -e ssh": 1.0}, check=(out, tree_bytes(os.path.join(root, area))))
    rm(out)()
    # store: a courier filled once, emptied into the far end's area each
    # run, against rsync -e ssh pushing the same files.
    dest_dir = os.path.join(root, "dest")

    def empty_ssh_dest():
        for n in os.listdir(dest_dir):
            p = os.path.join(dest_dir, n)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    for area in ("big", "small"):
        courier = os.path.join(root, "courier-" + area)
        sh("%s %s fetch %s %s%s/ %s -q" % (env, BIN, edb, url, area, courier))
        print("over ssh, store %s" % area, flush=True)
        compare("ssh store " + area, [
            ("bitfog", "%s %s store %s %sdest/ %s -q" % (env, BIN, courier, url, courier), empty_ssh_dest),
            ("rsync -e ssh push", "rsync -a --exclude=.bitfog -e '%s -p %d' %s/ %s@127.0.0.1:%s/"
             % (rsh, port, courier, user, dest_dir), empty_ssh_dest),
        ], {"rsync -e ssh push": 1.0}, check=(dest_dir, tree_bytes(os.path.join(root, area))))
        shutil.rmtree(courier)


def disks_section():
    """fetch into a courier on exFAT, FAT32 and NTFS (the FUSE drivers,
    images on loop devices; root only) and on the bench's own directory,
    against a plain copy of the same files onto the same filesystem: what
    bitfog adds to what the filesystem costs anyway."""
    root = tempfile.mkdtemp(prefix="disks-", dir=work)
    src = os.path.join(root, "src")
    os.makedirs(os.path.join(src, "small"))
    size = (64 << 20) if QUICK else (512 << 20)
    # fusefat scans a directory for every lookup: the peer, which puts
    # every small file in one directory, takes minutes on FAT32 at 2,000.
    count = 100 if QUICK else 500
    sh("openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv 0 -in /dev/zero 2>/dev/null"
       " | head -c %d > %s/image.bin" % (size, src))
    r = random.Random(5)
    for i in range(count):
        with open(os.path.join(src, "small", "f%05d:%d.txt" % (i, i % 3)), "wb") as f:
            f.write(r.randbytes(r.randint(1024, 65536)))
    total = tree_bytes(src)
    conf = os.path.join(root, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"}}' % src)
    port = free_port()
    start([BIN, "serve", "--conf", conf, "--addr", "127.0.0.1:%d" % port, "-q",
           "--cache", os.path.join(root, "cache")])
    wait_port(port)
    url = "http://127.0.0.1:%d/src/" % port
    edb = os.path.join(root, "empty.db")
    sh([BIN, "emptydb", edb, "-q"])
    sh([BIN, "builddb", url, os.path.join(root, "warm.db"), "-q"])
    # The peer: the same bytes written onto the same filesystem in 1 MiB
    # buffers, names made legal (':' to '_'), no metadata (cp and tar
    # fail on fusefat, which has no chmod).
    copier = os.path.join(root, "copy.py")
    with open(copier, "w") as f:
        f.write("import os, shutil, sys\n"
                "src, dst = sys.argv[1], sys.argv[2]\n"
                "for dp, dns, fs in os.walk(src):\n"
                "    out = os.path.join(dst, os.path.relpath(dp, src).replace(':', '_'))\n"
                "    os.makedirs(out, exist_ok=True)\n"
                "    for n in fs:\n"
                "        with open(os.path.join(dp, n), 'rb') as a, open(os.path.join(out, n.replace(':', '_')), 'wb') as b:\n"
                "            shutil.copyfileobj(a, b, 1 << 20)\n")
    mounts = []
    kinds = [("ext4 (the bench's directory)", None), ("exFAT (exfat-fuse)", "exfat"),
             ("NTFS (ntfs-3g)", "ntfs"), ("FAT32 (fusefat)", "fat32")]
    try:
        for label, kind in kinds:
            if kind is None:
                mnt = os.path.join(root, "plain")
                os.makedirs(mnt)
            else:
                img = os.path.join(root, kind + ".img")
                with open(img, "wb") as f:
                    f.truncate(total * 3 + (256 << 20))
                mkfs = {"exfat": ["mkfs.exfat", img], "fat32": ["mkfs.vfat", "-F", "32", img],
                        "ntfs": ["mkfs.ntfs", "-F", "-Q", img]}[kind]
                sh(mkfs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                dev = sh(["losetup", "-f", "--show", img], capture_output=True, text=True).stdout.strip()
                mnt = os.path.join(root, "mnt-" + kind)
                os.makedirs(mnt)
                mount = {"exfat": ["mount.exfat-fuse", dev, mnt], "fat32": ["fusefat", "-o", "rw+", dev, mnt],
                         "ntfs": ["ntfs-3g", dev, mnt]}[kind]
                sh(mount, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                mounts.append((mnt, dev))
            courier, copy = os.path.join(mnt, "courier"), os.path.join(mnt, "copy")
            print("fetch onto %s: one %d MiB file and %d files of 1-64 KiB" % (label, size >> 20, count), flush=True)
            compare("fetch onto " + label, [
                ("bitfog", "%s fetch %s %s %s -q" % (BIN, edb, url, courier), rm(courier)),
                ("copy", "python3 %s %s %s" % (copier, src, copy), rm(copy)),
            ], {})
    finally:
        for mnt, dev in mounts:
            subprocess.run(["umount", mnt])
            subprocess.run(["losetup", "-d", dev])


def crypt_section():
    """An encrypted courier (fetch --encrypt-to, store --identity) against
    a plain one, same file, same servers, alternating: what the
    encryption costs."""
    root = tempfile.mkdtemp(prefix="crypt-", dir=work)
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    size = (128 << 20) if QUICK else (1 << 30)
    sh("openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv 0 -in /dev/zero 2>/dev/null"
       " | head -c %d > %s/image.bin" % (size, src))
    conf = os.path.join(root, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' % (src, dst))
    port = free_port()
    start([BIN, "serve", "--conf", conf, "--addr", "127.0.0.1:%d" % port, "-q",
           "--cache", os.path.join(root, "cache")])
    wait_port(port)
    su, du = "http://127.0.0.1:%d/src/" % port, "http://127.0.0.1:%d/dst/" % port
    key = os.path.join(root, "dest.key")
    out = subprocess.run([BIN, "keygen", "-o", key], check=True, capture_output=True, text=True)
    recipient = out.stderr.strip().split()[-1]
    edb = os.path.join(root, "empty.db")
    sh([BIN, "emptydb", edb, "-q"])
    sh([BIN, "builddb", su, os.path.join(root, "warm.db"), "-q"])
    env = "BITFOG_STATE_DIR=%s" % os.path.join(root, "keepers")
    plain, sealed = os.path.join(root, "plain"), os.path.join(root, "sealed")
    print("fetch and store, one %d MiB file, encrypted courier against plain" % (size >> 20), flush=True)
    compare("fetch encrypted", [
        ("encrypted", "%s %s fetch %s %s %s --encrypt-to %s -q" % (env, BIN, edb, su, sealed, recipient), rm(sealed)),
        ("plain", "%s fetch %s %s %s -q" % (BIN, edb, su, plain), rm(plain)),
    ], {"plain": 1.3})

    def empty_dst():
        for n in os.listdir(dst):
            os.remove(os.path.join(dst, n))
    for c, extra in ((sealed, ["--encrypt-to", recipient]), (plain, [])):
        rm(c)()
        subprocess.run([BIN, "fetch", edb, su, c, "-q"] + extra, check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, BITFOG_STATE_DIR=os.path.join(root, "keepers")))
    compare("store encrypted", [
        ("encrypted", "%s store %s %s %s -i %s -q" % (BIN, sealed, du, sealed, key), empty_dst),
        ("plain", "%s store %s %s %s -q" % (BIN, plain, du, plain), empty_dst),
    ], {"plain": 1.3}, check=(dst, size))


def compare_pairs(name, contenders, pairs, check=None):
    """Like compare, for ratios between any two contenders: pairs is
    [(label a, label b, goal or None)], each row a's median against b's.
    The order rotates every round: on these VMs the run right after
    another contender's delete is the slow one, whoever it is."""
    times = {label: [] for label, _, _ in contenders}
    for r in range(RUNS):
        for label, cmd, before in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            times[label].append(timed(cmd, before, check))
    med = {k: (None if None in v else statistics.median(v)) for k, v in times.items()}
    for a, b, goal in pairs:
        if med[a] is None or med[b] is None:
            rows.append(("%s, %s" % (name, a), med[a], b + " (incomplete output)", None, None, "", ""))
            continue
        ratio = med[a] / med[b]
        verdict = "" if goal is None else ("met" if ratio <= goal else "NOT MET")
        rows.append(("%s, %s" % (name, a), med[a], b, med[b], ratio, "<= %.2fx" % goal if goal else "", verdict))
    print("  %s: %s" % (name, ", ".join("%s %s" % (k, "incomplete" if v is None else "%.2f s" % v)
                                         for k, v in med.items())), flush=True)
    print("    runs: %s" % "; ".join("%s %s" % (k, " ".join("-" if x is None else "%.2f" % x for x in v))
                                    for k, v in times.items()), flush=True)


def goals_section():
    """The performance issue's goals, against the peers both the 2-core VM
    and the 16-core machine have: an rsync daemon (pull and push), curl -o
    from bitfog's own server, find. Needs rsync, curl and openssl only,
    so it runs from scripts/device-pack.sh's folder where nothing can be
    installed."""
    big = (256 << 20) if QUICK else (2 << 30)
    small = 2000 if QUICK else 20000
    tiny = 10000 if QUICK else 100000
    root = os.path.join(work, "goals")
    gdata, gdest = os.path.join(root, "data"), os.path.join(root, "dest")
    t = time.time()
    os.makedirs(os.path.join(gdata, "big"))
    os.makedirs(gdest)
    sh("openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv 0 -in /dev/zero 2>/dev/null"
       " | head -c %d > %s" % (big, os.path.join(gdata, "big", "image.bin")))
    r = random.Random(3)
    for i in range(small):
        d = os.path.join(gdata, "small", "d%02d" % (i % 40))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(r.randbytes(r.randint(1024, 65536)))
    for i in range(tiny):
        d = os.path.join(gdata, "tiny", "d%04d" % (i % 1000))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%06d" % i), "wb") as f:
            f.write(r.randbytes(r.randint(0, 200)))
    sh("sync")
    print("goals data: one %d MiB file, %d files of 1-64 KiB, %d of 0-200 bytes (%.0f s to make)"
          % (big >> 20, small, tiny, time.time() - t), flush=True)
    conf = os.path.join(root, "bitfog.json")
    with open(conf, "w") as f:
        f.write('{"big":{"path":"%s/big"},"small":{"path":"%s/small"},"tiny":{"path":"%s/tiny"},'
                '"dest":{"path":"%s","writable":true}}' % (gdata, gdata, gdata, gdest))
    _, url = serve_bitfog(conf, os.path.join(root, "serve.log"), os.path.join(root, "cache"))
    port = free_port()
    rconf = os.path.join(root, "rsyncd.conf")
    with open(rconf, "w") as f:
        f.write("use chroot = no\nuid = root\ngid = root\n[data]\npath = %s\nread only = yes\n"
                "[dest]\npath = %s\nread only = no\n" % (gdata, gdest))
    start(["rsync", "--daemon", "--no-detach", "--address=127.0.0.1", "--port=%d" % port, "--config=" + rconf])
    wait_port(port)
    rsyncd = "rsync://127.0.0.1:%d" % port
    out = os.path.join(root, "out")
    edb = os.path.join(root, "empty.db")
    sh([BIN, "emptydb", edb, "-q"])

    def empty():
        for n in os.listdir(gdest):
            q = os.path.join(gdest, n)
            shutil.rmtree(q) if os.path.isdir(q) and not os.path.islink(q) else os.remove(q)

    print("goals: fetch one %d MiB file" % (big >> 20), flush=True)
    compare_pairs("fetch one %d MiB file" % (big >> 20), [
        ("bitfog", "%s fetch %s %sbig/ %s -q" % (BIN, edb, url, out), rm(out)),
        ("curl -o from bitfog serve", "mkdir -p %s && curl -sf -o %s/image.bin %sbig/image.bin" % (out, out, url), rm(out)),
        ("rsync", "rsync -a %s/data/big/ %s/" % (rsyncd, out), rm(out)),
    ], [("bitfog", "curl -o from bitfog serve", 1.05), ("bitfog", "rsync", None)], check=(out, big))
    print("goals: fetch %d small files" % small, flush=True)
    small_bytes = tree_bytes(os.path.join(gdata, "small"))
    compare_pairs("fetch %d files of 1-64 KiB" % small, [
        ("bitfog", "%s fetch %s %ssmall/ %s -q" % (BIN, edb, url, out), rm(out)),
        ("bitfog --jobs 4", "%s fetch %s %ssmall/ %s -q --jobs 4" % (BIN, edb, url, out), rm(out)),
        ("bitfog --jobs 16", "%s fetch %s %ssmall/ %s -q --jobs 16" % (BIN, edb, url, out), rm(out)),
        ("rsync", "rsync -a %s/data/small/ %s/" % (rsyncd, out), rm(out)),
    ], [("bitfog", "rsync", 0.8), ("bitfog --jobs 16", "bitfog --jobs 4", 1.0)], check=(out, small_bytes))
    for which, size in (("big", big), ("small", small_bytes)):
        print("goals: store %s" % which, flush=True)
        courier, sdb = os.path.join(root, "courier-" + which), os.path.join(root, which + ".db")
        sh([BIN, "builddb", url + which + "/", sdb, "-q"])
        sh([BIN, "fetch", edb, url + which + "/", courier, "-q"])
        store = "%s store %s %sdest/ %s -q" % (BIN, sdb, url, courier)
        contenders = [("bitfog", store, empty)]
        pairs = [("bitfog", "rsync push", 1.0 if which == "big" else 0.8)]
        if which == "small":
            # The default is 16 jobs (over HTTP): more is never slower.
            contenders.append(("bitfog --jobs 4", store + " --jobs 4", empty))
            pairs.append(("bitfog", "bitfog --jobs 4", 1.0))
        contenders.append(("rsync push", "rsync -a --exclude=.bitfog %s/ %s/dest/" % (courier, rsyncd), empty))
        compare_pairs("store %s" % ("one %d MiB file" % (big >> 20) if which == "big" else "%d files" % small),
                      contenders, pairs, check=(gdest, size))
        shutil.rmtree(courier)
    print("goals: builddb, warm hash cache", flush=True)
    tdb = os.path.join(root, "tiny.db")
    sh([BIN, "builddb", url + "tiny/", tdb, "-q"])
    compare_pairs("builddb %d files, warm hash cache" % tiny, [
        ("bitfog", "%s builddb %stiny/ %s -q" % (BIN, url, tdb), None),
        ("find -printf", "find %s/tiny -printf '%%P %%s %%T@\\n' > /dev/null" % gdata, None),
    ], [("bitfog", "find -printf", 1.5)])


rows = []
memory = []
sizes = []
try:
    if ONLY == "disks":
        disks_section()
    if ONLY == "crypt":
        crypt_section()
    if ONLY == "goals":
        goals_section()
    if ONLY in (None, "delta"):
        delta_section()
    if ONLY in (None, "ssh"):
        ssh_section()
    if ONLY is None:
        make_data()
        urls = bitfog_servers()
        ports = peer_servers()
        out = os.path.join(work, "out")
        edb = os.path.join(work, "empty.db")
        sh([BIN, "emptydb", edb, "-q"])
        nginx = "http://127.0.0.1:%d" % ports["nginx"]
        rsyncd = "rsync://127.0.0.1:%d" % ports["rsync"]
        rhttp = "http://127.0.0.1:%d" % ports["rclone_http"]
        rdav = "http://127.0.0.1:%d" % ports["rclone_dav"]

        print("fetch, one %d MiB file" % (BIG >> 20), flush=True)
        compare("fetch big", [
            ("bitfog", "%s fetch %s %sbig/ %s -q" % (BIN, edb, urls["main"], out), rm(out)),
            ("curl+nginx", "mkdir -p %s && curl -sf -o %s/image.bin %s/big/image.bin" % (out, out, nginx), rm(out)),
            ("rsync", "rsync -a %s/data/big/ %s/" % (rsyncd, out), rm(out)),
            ("rclone", "rclone copy --http-url %s/big/ :http: %s" % (rhttp, out), rm(out)),
        ], {"curl+nginx": 1.1, "rsync": 0.6}, check=(out, BIG))

        print("fetch, %d small files" % SMALL, flush=True)
        urlfile = os.path.join(work, "urls.txt")
        with open(urlfile, "w") as f:
            for dp, _, fs in os.walk(os.path.join(data, "small")):
                for n in fs:
                    rel = os.path.relpath(os.path.join(dp, n), data)
                    f.write('url = "%s/%s"\noutput = "%s/%s"\n' % (nginx, rel, out, rel))
        compare("fetch small", [
            ("bitfog", "%s fetch %s %ssmall/ %s -q" % (BIN, edb, urls["main"], out), rm(out)),
            ("curl+nginx", "curl -sf -Z --parallel-max 8 --create-dirs -K %s" % urlfile, rm(out)),
            ("rsync", "rsync -a %s/data/small/ %s/" % (rsyncd, out), rm(out)),
            ("rclone", "rclone copy --transfers 8 --http-url %s/small/ :http: %s" % (rhttp, out), rm(out)),
        ], {"rsync": 1.0, "rclone": 0.5}, check=(out, tree_bytes(os.path.join(data, "small"))))

        for which in ("big", "small"):
            print("store, %s" % which, flush=True)
            courier = os.path.join(work, "courier-" + which)
            sdb = os.path.join(work, which + ".db")
            sh([BIN, "builddb", urls["main"] + which + "/", sdb, "-q"])
            sh([BIN, "fetch", edb, urls["main"] + which + "/", courier, "-q"])
            contenders = [
                ("bitfog", "%s store %s %sdest/ %s -q" % (BIN, sdb, urls["main"], courier), empty_dest),
                ("rsync push", "rsync -a --exclude=.bitfog %s/ %s/dest/" % (courier, rsyncd), empty_dest),
            ]
            # rclone's WebDAV server took 168 s for 5,000 small files here;
            # at 50,000 it would dominate the run, so it is opt-in for those.
            if which == "big" or os.environ.get("BENCH_SLOW"):
                contenders.append(("rclone webdav", "rclone copy --transfers 8 --exclude '.bitfog/**' %s :webdav: --webdav-url %s"
                                   % (courier, rdav), empty_dest))
            compare("store " + which, contenders, {"rsync push": 1.0}, check=(dest, tree_bytes(os.path.join(data, which))))
            shutil.rmtree(courier)

        print("sparse image, %d MiB with %d MiB of data" % (SPARSE >> 20, SPARSE_DATA >> 20), flush=True)
        compare("fetch sparse image", [
            ("bitfog", "%s fetch %s %ssparse/ %s -q" % (BIN, edb, urls["main"], out), rm(out)),
            ("bitfog, plain file of the data's size", "%s fetch %s %splain/ %s -q" % (BIN, edb, urls["main"], out), rm(out)),
            ("rsync --sparse", "rsync -a --sparse %s/data/sparse/ %s/" % (rsyncd, out), rm(out)),
        ], {"bitfog, plain file of the data's size": 1.5})
        for label, cmd in (("bitfog", "%s fetch %s %ssparse/ %s -q" % (BIN, edb, urls["main"], out)),
                           ("rsync --sparse", "rsync -a --sparse %s/data/sparse/ %s/" % (rsyncd, out))):
            rm(out)()
            sh(cmd)
            used = sh("du -B1 -s --exclude=.bitfog %s" % out, capture_output=True, text=True).stdout.split()[0]
            print("  %s: the copy takes %s bytes on disk for %d bytes of data (%.3fx)"
                  % (label, used, SPARSE_DATA, int(used) / SPARSE_DATA), flush=True)
        rm(out)()

        print("listings, %d tiny files" % TINY, flush=True)
        tdb = os.path.join(work, "tiny.db")
        compare("builddb checksum off", [
            ("bitfog", "%s builddb %stinyfast/ %s -q" % (BIN, urls["main"], tdb), None),
            ("find", "find %s/tiny -printf '%%P %%s %%T@\\n' > /dev/null" % data, None),
            ("rsync --list-only", "rsync --list-only -r %s/data/tiny/ > /dev/null" % rsyncd, None),
        ], {"find": 1.5})
        cache_files = lambda: [os.remove(os.path.join(work, "hashcache", n)) for n in os.listdir(os.path.join(work, "hashcache"))
                               if n.startswith("tiny.")] if os.path.isdir(os.path.join(work, "hashcache")) else None
        compare("builddb cold hash cache", [
            ("bitfog", "%s builddb %stiny/ %s -q" % (BIN, urls["main"], tdb), cache_files),
            ("find", "find %s/tiny -printf '%%P %%s %%T@\\n' > /dev/null" % data, None),
        ], {})
        sh([BIN, "builddb", urls["main"] + "tiny/", tdb, "-q"])
        compare("builddb warm hash cache", [
            ("bitfog", "%s builddb %stiny/ %s -q" % (BIN, urls["main"], tdb), None),
            ("find", "find %s/tiny -printf '%%P %%s %%T@\\n' > /dev/null" % data, None),
        ], {"find": 2.0})

        print("SHA-256 of the %d MiB file" % (BIG >> 20), flush=True)
        image = os.path.join(data, "big", "image.bin")
        memory = memory_section()

        compare("sha256 (a cold listing)", [
            ("bitfog", "%s builddb %sbig/ %s -q" % (BIN, urls["nocache"], os.path.join(work, "b.db")), None),
            ("openssl", "openssl dgst -sha256 %s" % image, None),
            ("sha256sum", "sha256sum %s" % image, None),
        ], {"openssl": 1.0})
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(work, ignore_errors=True)

cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip("\t: ")
print("\nbitfog bench: %d runs each, alternating, %.0f s settle; %s, %d cores; medians in seconds"
      % (RUNS, SETTLE, cpu, os.cpu_count()))
print("| workload | bitfog | peer | peer | bitfog/peer | goal | |")
print("|---|---|---|---|---|---|---|")
for name, ours, label, theirs, ratio, goal, verdict in rows:
    if theirs is None:
        print("| %s | %s | %s | | | | |" % (name, "incomplete" if ours is None else "%.2f" % ours, label))
    else:
        print("| %s | %.2f | %s | %.2f | %.2f | %s | %s |" % (name, ours, label, theirs, ratio, goal, verdict))
if memory:
    print("\npeak RSS over %d entries" % MILLION)
    print("| command | peak RSS (MiB) | goal | |")
    print("|---|---|---|---|")
for name, kib, goal in memory:
    print("| %s | %.1f | < %d MiB | %s |" % (name, kib / 1024, goal, "met" if kib < goal * 1024 else "NOT met"))
if sizes:
    print("\nsizes, delta workload (%d MiB file)" % (DELTA_SIZE >> 20))
    print("| what | bytes | against | ratio | goal | |")
    print("|---|---|---|---|---|---|")
    for what, n, against, ratio, goal in sizes:
        verdict = "" if goal is None else ("met" if ratio <= goal else "NOT MET")
        print("| %s | %d | %s | %s | %s | %s |" % (what, n, against, "" if ratio is None else "%.4f" % ratio,
                                               "" if goal is None else "<= %gx" % goal, verdict))
