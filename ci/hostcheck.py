#!/usr/bin/env python3
# ci/hostcheck.py: host-side checks of ci/guest-tests.sh and ci/sva-tests.sh.
#
# Owns: judging the daemon's state, read through its control plane
# (`vhost-device-iommu ctl --control-socket SOCK ... --json`), its event
# stream (`watch`: a subscriber of the control protocol that records every
# event as a JSON line) and its debug log, against what the guest reported
# on its console; and a minimal QMP client for the hot-unplug.  Every
# check prints exactly one line, "PASS <detail>" or "FAIL <detail>", and
# exits 0 (the runner counts the verdicts); a usage error exits 2.
# Python standard library only.
#
# Usage: hostcheck.py CHECK [ARGS...]   (see the dispatch table at the end)
# Common options: --bin DAEMON_BINARY --ctl CONTROL_SOCKET

import argparse
import json
import re
import socket
import struct
import subprocess
import sys
import time

PAGE = 0x1000
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)


class CheckFailed(Exception):
    pass


class Ctl:
    """Runs `vhost-device-iommu ctl` and returns its JSON output."""

    def __init__(self, binary, sock):
        self.binary = binary
        self.sock = sock

    def __call__(self, *args):
        cmd = [self.binary, "ctl", "--control-socket", self.sock, *map(str, args), "--json"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CheckFailed(f"ctl {' '.join(map(str, args))}: {e}") from e
        # `ctl translate` exits 3 on a fault, with the fault as its JSON.
        if p.returncode != 0 and not (args[0] == "translate" and p.returncode == 3):
            msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
            raise CheckFailed(f"ctl {' '.join(map(str, args))} exited {p.returncode}: {msg[-1] if msg else ''}")
        try:
            return json.loads(p.stdout)
        except json.JSONDecodeError as e:
            raise CheckFailed(f"ctl {' '.join(map(str, args))}: not JSON ({e}): {p.stdout[:200]!r}") from e


def console_lines(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").replace("\r", "").splitlines()


def fields(line):
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def guest_pages(console):
    """IOVA page -> GPA page of the guest's vfio-map MAP/PAGE lines, up to
    its first HOLD (the mappings that exist while it holds)."""
    pages = {}
    for line in console_lines(console):
        m = re.search(r"vfio-map: (MAP|PAGE|HOLD) ?(.*)", line)
        if not m:
            continue
        if m.group(1) == "HOLD":
            break
        f = fields(m.group(2))
        pages[int(f["iova"], 16)] = int(f["gpa"], 16)
    if not pages:
        raise CheckFailed("the guest reported no vfio-map MAP line before HOLD")
    return pages


def domain_of(ctl, endpoint):
    eps = ctl("endpoints")
    for e in eps["endpoints"]:
        if e["id"] == endpoint:
            return e["domain"]
    return None


def expand(mappings, limit=1 << 16):
    """IOVA page -> (GPA page, flags) of the daemon's mappings."""
    pages = {}
    for m in mappings:
        n = (m["virt_end"] + 1 - m["virt_start"]) // PAGE
        if n > limit:
            raise CheckFailed(f"mapping {m['virt_start']:#x}-{m['virt_end']:#x} is too large to be a vfio-map buffer")
        for i in range(n):
            pages[m["virt_start"] + i * PAGE] = (m["phys_start"] + i * PAGE, (m["read"], m["write"], m["mmio"]))
    return pages


def check_attached(a):
    ctl = Ctl(a.bin, a.ctl)
    doms = {ep: domain_of(ctl, ep) for ep in a.endpoint}
    missing = [ep for ep, d in doms.items() if d is None]
    if missing:
        raise CheckFailed(f"endpoint(s) {missing} not attached; ctl endpoints: {json.dumps(ctl('endpoints'))}")
    return "attached: " + ", ".join(f"endpoint {ep} -> domain {d}" for ep, d in doms.items())


def check_probe(a):
    stats = Ctl(a.bin, a.ctl)("stats")
    n = stats["requests"]["probe"]
    if n < a.min:
        raise CheckFailed(f"{n} PROBE requests, expected at least {a.min}")
    return f"{n} PROBE requests (at least {a.min}: one per endpoint)"


def check_mappings(a):
    ctl = Ctl(a.bin, a.ctl)
    want = guest_pages(a.console)
    dom = domain_of(ctl, a.endpoint)
    if dom is None:
        raise CheckFailed(f"endpoint {a.endpoint} is not attached while the guest holds its mappings")
    with open(a.save_domain, "w") as f:
        f.write(f"{dom}\n")
    m = ctl("mappings", "--domain", dom)
    have = expand(m["mappings"])
    got = {iova: gpa for iova, (gpa, _) in have.items()}
    if got != want:
        extra = sorted(set(got.items()) - set(want.items()))[:4]
        lost = sorted(set(want.items()) - set(got.items()))[:4]
        raise CheckFailed(
            f"domain {dom}: daemon pages != guest pages; only in daemon {[(hex(i), hex(g)) for i, g in extra]}, "
            f"only in guest {[(hex(i), hex(g)) for i, g in lost]}"
        )
    flags = {f for _, f in have.values()}
    if flags != {(True, True, False)}:
        raise CheckFailed(f"domain {dom}: flags (read, write, mmio) {flags}, expected read+write")
    if m.get("bypass"):
        raise CheckFailed(f"domain {dom} is a bypass domain")
    return f"domain {dom}: exactly the guest's {len(want)} IOVA->GPA pages in {len(m['mappings'])} mappings, read+write"


def translate(ctl, endpoint, iova, write=False):
    args = ["translate", "--endpoint", endpoint, "--iova", hex(iova), "--len", PAGE]
    if write:
        args.append("--write")
    return ctl(*args)


def check_translate(a):
    ctl = Ctl(a.bin, a.ctl)
    want = guest_pages(a.console)
    for iova, gpa in sorted(want.items()):
        r = translate(ctl, a.endpoint, iova, write=True)
        segs = r.get("segments") or []
        if not r.get("ok") or len(segs) != 1 or segs[0]["gpa"] != gpa or segs[0]["len"] != PAGE:
            raise CheckFailed(f"translate {iova:#x}: {json.dumps(r)}, expected gpa {gpa:#x}")
    hole = max(want) + 2 * PAGE  # inside the vfio-map stride gap: unmapped
    while hole in want:
        hole += PAGE
    r = translate(ctl, a.endpoint, hole)
    if r.get("ok") or (r.get("fault") or {}).get("reason") != "mapping":
        raise CheckFailed(f"translate of unmapped {hole:#x}: {json.dumps(r)}, expected a mapping fault")
    return f"{len(want)} guest IOVAs translate to their GPAs; unmapped {hole:#x} faults (reason mapping)"


def dma_pages(console):
    """IOVA page -> (GPA page, writable) of vfio-dma's MAP/PAGE lines up to
    its HOLD."""
    pages, writable = {}, None
    for line in console_lines(console):
        m = re.search(r"vfio-dma: (MAP|PAGE|HOLD) ?(.*)", line)
        if not m:
            continue
        if m.group(1) == "HOLD":
            break
        if m.group(1) == "MAP":
            writable = m.group(2).split()[-1] == "rw"
        f = fields(m.group(2))
        pages[int(f["iova"], 16)] = (int(f["gpa"], 16), writable)
    if not pages:
        raise CheckFailed("the guest reported no vfio-dma MAP line before HOLD")
    return pages


def check_dma_translate(a):
    ctl = Ctl(a.bin, a.ctl)
    want = dma_pages(a.console)
    for iova, (gpa, writable) in sorted(want.items()):
        r = translate(ctl, a.endpoint, iova, write=writable)
        segs = r.get("segments") or []
        if not r.get("ok") or len(segs) != 1 or segs[0]["gpa"] != gpa or segs[0]["len"] != PAGE:
            raise CheckFailed(f"translate {iova:#x}: {json.dumps(r)}, expected gpa {gpa:#x}")
        if not writable:
            r = translate(ctl, a.endpoint, iova, write=True)
            if r.get("ok") or (r.get("fault") or {}).get("reason") != "mapping":
                raise CheckFailed(f"write to read-only {iova:#x}: {json.dumps(r)}, expected a mapping fault")
    hole = max(want) + 0x100000
    r = translate(ctl, a.endpoint, hole)
    if r.get("ok"):
        raise CheckFailed(f"translate of unmapped {hole:#x}: {json.dumps(r)}, expected a fault")
    ro = sum(1 for _, w in want.values() if not w)
    return (f"the device's {len(want)} DMA pages translate to the GPAs the guest mapped "
            f"({ro} read-only, refusing writes); unmapped {hole:#x} faults")


def check_dma_faults(a):
    # The device reports faults from a thread of its own: give the last
    # ones a moment to arrive.
    ctl, deadline = Ctl(a.bin, a.ctl), time.monotonic() + 3
    while True:
        faults = ctl("stats")["faults"]
        if faults["delivered"] >= a.expect or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if faults["delivered"] != a.expect or faults["dropped"] or faults["pending"]:
        raise CheckFailed(f"faults {json.dumps(faults)}, expected exactly {a.expect} delivered")
    return f"the device reported {a.expect} translation faults, all delivered to the guest: {json.dumps(faults)}"


def check_unmapped(a):
    ctl = Ctl(a.bin, a.ctl)
    want = guest_pages(a.console)
    with open(a.domain_file) as f:
        dom = int(f.read())
    now = domain_of(ctl, a.endpoint)
    if now != dom:
        raise CheckFailed(f"endpoint {a.endpoint} is in domain {now}, expected still in {dom} (container open)")
    m = ctl("mappings", "--domain", dom)
    if m["mappings"]:
        raise CheckFailed(f"domain {dom} still has {len(m['mappings'])} mapping(s): {m['mappings'][:3]}")
    for iova in sorted(want):
        r = translate(ctl, a.endpoint, iova)
        if r.get("ok") or (r.get("fault") or {}).get("reason") != "mapping":
            raise CheckFailed(f"translate {iova:#x} after UNMAP: {json.dumps(r)}")
    d = stat_delta(a.stats_before, ctl("stats"), "unmap")
    if d < 1:
        raise CheckFailed(f"no UNMAP request counted ({d})")
    return f"domain {dom} (endpoint {a.endpoint} still attached) has no mapping left; {d} UNMAP requests; IOVAs fault"


def stat_delta(before_file, after, key):
    with open(before_file) as f:
        before = json.load(f)
    return after["requests"][key] - before["requests"][key]


def check_stat_delta(a):
    after = Ctl(a.bin, a.ctl)("stats")
    d = stat_delta(a.stats_before, after, a.key)
    if d < a.min:
        raise CheckFailed(f"{a.key} requests grew by {d}, expected at least {a.min}")
    return f"{a.key} requests grew by {d} (at least {a.min})"


def check_fault(a):
    ctl = Ctl(a.bin, a.ctl)
    r = ctl("fault", "--endpoint", a.endpoint, "--address", a.address, "--write")
    if not r.get("ok"):
        raise CheckFailed(f"ctl fault: {json.dumps(r)}")
    return f"ctl fault --endpoint {a.endpoint} --address {a.address} --write queued"


def check_fault_seen(a):
    want = re.compile(rf"page fault from EP {a.endpoint} at {a.address} \[W\]")
    lines = [l for l in console_lines(a.console) if l.startswith("VDI-FAULT ")]
    hit = [l for l in lines if want.search(l)]
    if not hit:
        raise CheckFailed(f"no guest message matching '{want.pattern}'; VDI-FAULT lines: {lines[:3]}")
    if len(lines) != len(hit):
        raise CheckFailed(f"unexpected fault messages besides the injected one: {lines[:4]}")
    return "guest dmesg: " + hit[0][len("VDI-FAULT "):].strip()


def check_unplugged(a):
    ctl = Ctl(a.bin, a.ctl)
    doms = ctl("domains")["domains"]
    holding = [d["id"] for d in doms if a.endpoint in d["endpoints"]]
    if holding:
        raise CheckFailed(f"endpoint {a.endpoint} is still in domain(s) {holding}")
    if domain_of(ctl, a.endpoint) is not None:
        raise CheckFailed(f"ctl endpoints still lists endpoint {a.endpoint}")
    stats = ctl("stats")
    d = stat_delta(a.stats_before, stats, "detach")
    if d < 1 or stats["requests"]["detach"] < 1:
        raise CheckFailed(f"no DETACH counted (delta {d}, total {stats['requests']['detach']})")
    rest = ", ".join(f"domain {x['id']}: endpoints {x['endpoints']}" for x in doms) or "no domain left"
    return f"DETACH x{d}; no domain holds endpoint {a.endpoint} ({rest})"


def domain_record(ctl, endpoint):
    dom = domain_of(ctl, endpoint)
    if dom is None:
        raise CheckFailed(f"endpoint {endpoint} not attached; ctl endpoints: {json.dumps(ctl('endpoints'))}")
    for d in ctl("domains")["domains"]:
        if d["id"] == dom:
            return d
    raise CheckFailed(f"ctl endpoints says domain {dom}, ctl domains does not list it")


def check_bypass(a):
    ctl = Ctl(a.bin, a.ctl)
    d = domain_record(ctl, a.endpoint)
    if d["bypass"] is not True or d["mappings"] != 0:
        raise CheckFailed(f"domain of endpoint {a.endpoint}: {json.dumps(d)}, expected bypass with no mapping")
    return f"endpoint {a.endpoint} in bypass domain {d['id']} (no mapping)"


def gaps(mappings, end):
    """Unmapped ranges of [0, end]."""
    out, at = [], 0
    for m in sorted(mappings, key=lambda m: m["virt_start"]):
        if m["virt_start"] > at:
            out.append((at, m["virt_start"] - 1))
        at = max(at, m["virt_end"] + 1)
    if at <= end:
        out.append((at, end))
    return out


def check_identity(a):
    ctl = Ctl(a.bin, a.ctl)
    d = domain_record(ctl, a.endpoint)
    if d["bypass"]:
        raise CheckFailed(f"domain {d['id']} is a bypass domain, expected identity mappings (no BYPASS_CONFIG)")
    ms = ctl("mappings", "--domain", d["id"])["mappings"]
    if not 1 <= len(ms) <= 16:
        raise CheckFailed(f"domain {d['id']}: {len(ms)} mappings, expected a handful")
    for m in ms:
        if m["virt_start"] != m["phys_start"] or not (m["read"] and m["write"]):
            raise CheckFailed(f"domain {d['id']}: mapping {json.dumps(m)} is not a read+write identity map")
    end = (1 << a.input_bits) - 1
    g = gaps(ms, end)
    if g != [MSI_WINDOW]:
        raise CheckFailed(f"domain {d['id']}: unmapped ranges {[(hex(x), hex(y)) for x, y in g]}, expected only the MSI window")
    desc = ", ".join(f"[{m['virt_start']:#x}, {m['virt_end']:#x}]" for m in sorted(ms, key=lambda m: m["virt_start"]))
    return f"domain {d['id']}: {len(ms)} identity maps {desc} cover [0, {end:#x}] except the MSI window"


def check_health(a):
    ctl = Ctl(a.bin, a.ctl)
    st = ctl("status")
    if st["pid"] != a.pid:
        raise CheckFailed(f"control plane reports pid {st['pid']}, the runner started {a.pid}")
    with open(a.log, errors="replace") as f:
        log = f.read().splitlines()
    errors = [l for l in log if re.match(r"^\[\S+ ERROR ", l)]
    if errors:
        raise CheckFailed(f"{len(errors)} ERROR line(s) in the daemon log, first: {errors[0]}")
    starts = sum(1 for l in log if "listening on" in l)
    if starts != 1:
        raise CheckFailed(f"'listening on' logged {starts} times (restarted?)")
    return f"pid {a.pid} still serving, started once, no ERROR line; status {json.dumps(st)}"


def check_pasids(a):
    """The VM's PASIDs in the daemon against the guest's VDI-PASIDS line
    (ci/sva-tests.sh): --held, each is active and mapped to itself
    (PASID_ALLOC gives the host PASID to the guest); --none, the VM holds
    none (every one freed and its last reference dropped)."""
    doc = Ctl(a.bin, a.ctl)("pasids")
    mine = doc.get("pasids", [])
    if a.none:
        if mine:
            raise CheckFailed(f"the VM still holds {len(mine)} PASID(s): {json.dumps(mine[:4])}")
        return "the VM holds no PASID"
    want = None
    for line in console_lines(a.console):
        if line.startswith("VDI-PASIDS"):
            want = [int(x) for x in line.split()[1:]]
    if not want:
        raise CheckFailed("the guest printed no VDI-PASIDS line")
    by_guest = {p.get("guest"): p for p in mine}
    for g in want:
        p = by_guest.get(g)
        if p is None:
            raise CheckFailed(f"guest PASID {g} unknown to the daemon ({len(mine)} PASIDs: {json.dumps(mine[:4])})")
        if p.get("state") != "active" or p.get("host") != g:
            raise CheckFailed(f"guest PASID {g}: {json.dumps(p)}")
    return f"all {len(want)} guest PASIDs active in the daemon, host == guest ({want[0]}..)"


def check_unplug_qmp(a):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(a.timeout)
    s.connect(a.qmp)
    f = s.makefile("rw")
    f.readline()  # greeting

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r
            events.append(r)

    events = []
    cmd("qmp_capabilities")
    r = cmd("device_del", id=a.id)
    if "error" in r:
        raise CheckFailed(f"device_del {a.id}: {r['error'].get('desc')}")
    t0 = time.monotonic()
    while not any(e.get("event") == "DEVICE_DELETED" and e["data"].get("device") == a.id for e in events):
        try:
            line = f.readline()
        except socket.timeout as e:
            raise CheckFailed(f"no DEVICE_DELETED for {a.id} within {a.timeout}s") from e
        if not line:
            raise CheckFailed("QMP connection closed before DEVICE_DELETED")
        events.append(json.loads(line))
    return f"device_del {a.id}: DEVICE_DELETED after {time.monotonic() - t0:.2f}s"


# --- SVA (ci/sva-tests.sh) -------------------------------------------------

EVENT_KINDS = {1: "attach", 2: "detach", 3: "map", 4: "unmap", 5: "bypass", 6: "reset",
               7: "table-bound", 8: "table-unbound", 9: "table-invalidate"}
TABLE_F_PASID, TABLE_F_RANGE = 1 << 0, 1 << 3
HELLO_F_SUBSCRIBE = 1 << 1


def watch(a):
    """Subscribes to the daemon's event stream (docs/control-protocol.md,
    without SYNC: the guest never waits for this client) and appends every
    event to --out as a JSON object per line, until the daemon closes the
    connection or the process is killed."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(a.ctl)
    hello = b"VIOMMUCP" + struct.pack("<HHI", 1, 0, HELLO_F_SUBSCRIBE)
    s.sendall(struct.pack("<IB", 1 + len(hello), 0x01) + hello)
    buf = b""
    with open(a.out, "a") as out:
        while True:
            data = s.recv(1 << 16)
            if not data:
                return "connection closed"
            buf += data
            while len(buf) >= 5:
                n, = struct.unpack_from("<I", buf)
                if len(buf) < 4 + n:
                    break
                typ, body, buf = buf[4], buf[5:4 + n], buf[4 + n:]
                if typ == 0x9F:
                    return "BYE " + body.decode(errors="replace")
                if typ != 0x91:
                    continue
                seq, kind, flags, endpoint, domain, map_flags, start, end, phys = \
                    struct.unpack_from("<QBBxxIIIQQQ", body)
                ev = {"seq": seq, "kind": EVENT_KINDS.get(kind, kind), "flags": flags,
                      "endpoint": endpoint, "domain": domain, "start": start, "end": end,
                      "t": time.monotonic()}
                if len(body) >= 48 + 48:
                    (pasid, fmt, tflags, root, fl_flags, archid, width, _s1fmt, _s1dss,
                     granule, _cdmax, inv_types, out_bits) = struct.unpack_from(
                        "<IHBxQQQBBBBIHB", body, 48)
                    ev.update(pasid=pasid, format=fmt, tflags=tflags, root=root,
                              fl_flags=fl_flags, addr_width=width, granule=granule,
                              inv_types=inv_types)
                out.write(json.dumps(ev) + "\n")
                out.flush()


def events(path, want, timeout=3.0):
    """The recorded events, waiting up to `timeout` for `want(events)`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                evs = [json.loads(l) for l in f if l.endswith("\n")]
        except FileNotFoundError:
            evs = []
        if want(evs) or time.monotonic() >= deadline:
            return evs
        time.sleep(0.05)


def table_events(evs, kind, pasid):
    return [e for e in evs if e["kind"] == kind and e.get("tflags", 0) & TABLE_F_PASID
            and e.get("pasid") == pasid]


def log_index(lines, pattern):
    """Index of the last daemon log line matching `pattern`, or None (a
    PASID number may have been used before, by an earlier binding)."""
    rx = re.compile(pattern)
    return next((i for i in range(len(lines) - 1, -1, -1) if rx.search(lines[i])), None)


def read_log(path):
    with open(path, errors="replace") as f:
        return f.read().splitlines()


def check_sva_bound(a):
    """The guest's BIND as the daemon holds it: both endpoints bound at the
    PASID through one SVA domain, to one VT-d table of the right width,
    user-only (fl_flags 0), announced as TABLE_BOUND events."""
    ctl = Ctl(a.bin, a.ctl)
    eps = sorted(int(e, 0) for e in a.eps.split(",") if int(e, 0))
    tables = [t for t in ctl("pasid-tables")["tables"] if t["pasid"] == a.pasid]
    if sorted(t["endpoint"] for t in tables) != eps:
        raise CheckFailed(f"PASID {a.pasid} bound for endpoints {[t['endpoint'] for t in tables]}, "
                          f"the guest bound {eps}: {json.dumps(tables)}")
    for t in tables:
        if (t["domain"], t["format"], t["addr_width"], t["fl_flags"]) != \
                (a.domain, "vtd", a.addr_width, 0) or t["root"] % PAGE or not t["root"] \
                or t["root"] != tables[0]["root"]:
            raise CheckFailed(f"binding {json.dumps(t)}: expected domain {a.domain}, vtd, "
                              f"addr_width {a.addr_width}, fl_flags 0, one page-aligned root")
    mine = {p["host"]: p for p in ctl("pasids")["pasids"]}
    p = mine.get(a.pasid)
    if not p or p["state"] != "active" or p["guest"] != a.pasid:
        raise CheckFailed(f"PASID {a.pasid} in the daemon: {json.dumps(p)}")
    bound = events(a.events, lambda evs: len(table_events(evs, "table-bound", a.pasid)) >= len(eps))
    bound = table_events(bound, "table-bound", a.pasid)[-len(eps):]
    if sorted(e["endpoint"] for e in bound) != eps or any(e["root"] != tables[0]["root"] for e in bound):
        raise CheckFailed(f"TABLE_BOUND events for PASID {a.pasid}: {json.dumps(bound)}")
    return (f"PASID {a.pasid} bound for endpoints {eps} through domain {a.domain}: VT-d table at "
            f"{tables[0]['root']:#x}, addr_width {a.addr_width}, fl_flags 0; PASID active "
            f"(refs {p['refs']}); {len(bound)} TABLE_BOUND events")


def check_stats_save(a):
    doc = Ctl(a.bin, a.ctl)("stats")
    with open(a.out, "w") as f:
        json.dump(doc, f)
    return f"saved to {a.out}"


def guest_counts(text):
    return {k: int(v) for k, v in (kv.split("=", 1) for kv in text.split() if "=" in kv)}


def check_pr_counts(a):
    """The module's page-request counters (from its STATS ioctl, since the
    step began) against the daemon's `ctl stats` page_requests section:
    every group raised was delivered, each was answered exactly once (by
    the guest, or by the device for it, which makes the guest's late
    answer an unknown one), and nothing is left in flight."""
    g = guest_counts(a.guest)
    pr = Ctl(a.bin, a.ctl)("stats")["page_requests"]
    if a.before:
        with open(a.before) as f:
            b = json.load(f)["page_requests"]
    else:
        b = {"raised": 0, "delivered": 0, "guest": {}, "auto": {}, "unknown_responses": 0}

    def d(key, sub=None):
        if sub is None:
            return pr[key] - b.get(key, 0)
        return pr[key].get(sub, 0) - b[key].get(sub, 0)

    auto = sum(pr["auto"].values()) - sum(b["auto"].values())
    daemon = {"raised": d("raised"), "delivered": d("delivered"), "success": d("guest", "success"),
              "invalid": d("guest", "invalid"), "failure": d("guest", "failure"),
              "unknown": d("unknown_responses"), "auto": auto, "in_flight": pr["in_flight"]}
    want = [("raised", daemon["raised"], g["groups"]), ("delivered", daemon["delivered"], g["groups"]),
            ("success", daemon["success"], g["success"]), ("invalid", daemon["invalid"], g["invalid"]),
            ("failure", daemon["failure"], g["failure"]), ("unknown responses", daemon["unknown"], g["stale"]),
            ("device answers", daemon["auto"], g["stale"]), ("in flight", daemon["in_flight"], 0),
            ("guest errors", g["errors"], 0), ("guest events lost", g["lost"], 0)]
    bad = [f"{n} {got} != {exp}" for n, got, exp in want if got != exp]
    if a.exact_groups is not None and g["groups"] != a.exact_groups:
        bad.append(f"{g['groups']} groups, expected {a.exact_groups}")
    if bad:
        raise CheckFailed("; ".join(bad) + f" (guest {json.dumps(g)}, daemon {json.dumps(daemon)}, "
                          f"auto {json.dumps(pr['auto'])})")
    return (f"guest and daemon agree: {g['groups']} groups raised and delivered, answered "
            f"{g['success']} SUCCESS + {g['invalid']} INVALID + {g['failure']} FAILURE by the guest and "
            f"{daemon['auto']} by the device (the guest's late answers to those: {g['stale']} unknown), "
            f"none in flight")


def check_invalidated(a):
    """munmap made the guest's MMU notifier send INVALIDATE: a
    TABLE_INVALIDATE of the PASID whose range covers the hole (or the
    whole PASID) reached the event stream."""
    lo, hi = a.addr, a.addr + a.len - 1

    def covering(evs):
        return [e for e in table_events(evs, "table-invalidate", a.pasid)
                if not e["tflags"] & TABLE_F_RANGE or (e["start"] <= lo and e["end"] >= hi)]

    evs = events(a.events, lambda evs: covering(evs))
    cover = covering(evs)
    if not cover:
        inv = table_events(evs, "table-invalidate", a.pasid)
        raise CheckFailed(f"no TABLE_INVALIDATE of PASID {a.pasid} covers [{lo:#x}, {hi:#x}]; "
                          f"{len(inv)} for the PASID: {json.dumps(inv[-3:])}")
    e = cover[-1]
    what = (f"[{e['start']:#x}, {e['end']:#x}]" if e["tflags"] & TABLE_F_RANGE else "the whole PASID")
    return (f"munmap of [{lo:#x}, {hi:#x}]: INVALIDATE of {what} (granule {e['granule']}, "
            f"types {e['inv_types']:#x}) in the daemon's event stream (seq {e['seq']})")


def unbind_order(lines, evs, endpoints, pasid):
    """(ok, detail): TABLE_UNBOUND of `endpoints` in order, and in the
    daemon's log each DETACH_TABLE before the PASID_FREE."""
    unbound = [e["endpoint"] for e in table_events(evs, "table-unbound", pasid)][-len(endpoints):]
    detach = [log_index(lines, rf"DETACH_TABLE endpoint {ep} PASID {pasid}\b") for ep in endpoints]
    free = log_index(lines, rf"PASID_FREE PASID {pasid}\b")
    ok = unbound == endpoints and None not in detach and free is not None and \
        detach == sorted(detach) and max(detach) < free
    return ok, (f"TABLE_UNBOUND events for endpoints {unbound}; log lines: DETACH_TABLE {detach}, "
                f"PASID_FREE {free}")


def check_child_gone(a):
    """The child exited with DMA in flight: nothing of its PASID is left
    in the daemon (binding, PASID, page-request group), the host store
    records only what the VM still holds, and the guest tore it down in
    order: INVALIDATE of the PASID, DETACH_TABLE, then PASID_FREE."""
    ctl = Ctl(a.bin, a.ctl)
    bound = [t for t in ctl("pasid-tables")["tables"] if t["pasid"] == a.pasid]
    if bound:
        raise CheckFailed(f"PASID {a.pasid} still bound: {json.dumps(bound)}")
    doc = ctl("pasids")
    held = [p["host"] for p in doc["pasids"]]
    if held != [a.parent]:
        raise CheckFailed(f"the VM holds PASIDs {held}, expected only the parent's {a.parent}")
    mine = [s for s in doc["sets"] if s.get("this_daemon")]
    if len(mine) != 1 or mine[0]["pasids"] != 1 or mine[0]["active"] != 1:
        raise CheckFailed(f"the host store records {json.dumps(mine)} for this VM, expected 1 PASID")
    groups = ctl("faults")["groups"]
    pr = ctl("stats")["page_requests"]
    if groups or pr["in_flight"]:
        raise CheckFailed(f"page requests still in flight: {pr['in_flight']}, {json.dumps(groups[:3])}")
    evs = events(a.events, lambda evs: table_events(evs, "table-unbound", a.pasid))
    unb = table_events(evs, "table-unbound", a.pasid)[-1:]
    bound_at = max((e["seq"] for e in table_events(evs, "table-bound", a.pasid)), default=0)
    inv = [e for e in table_events(evs, "table-invalidate", a.pasid)
           if not e["tflags"] & TABLE_F_RANGE and e["seq"] > bound_at]
    ok, detail = unbind_order(read_log(a.log), evs, [a.endpoint], a.pasid)
    if not inv or not unb or inv[0]["seq"] > unb[0]["seq"] or not ok:
        raise CheckFailed(f"teardown of PASID {a.pasid}: whole-PASID INVALIDATE seqs "
                          f"{[e['seq'] for e in inv]}, TABLE_UNBOUND seqs {[e['seq'] for e in unb]}; {detail}")
    return (f"child PASID {a.pasid}: no binding, no PASID, no page-request group left; the store "
            f"records only the parent's PASID {a.parent}; torn down as INVALIDATE (whole PASID, seq "
            f"{inv[0]['seq']}) -> DETACH_TABLE (seq {unb[0]['seq']}) -> PASID_FREE ({detail})")


def check_unbound(a):
    """UNBIND of both endpoints: DETACH_TABLE of each, in the order the
    guest unbound them, then PASID_FREE; nothing bound or held after."""
    ctl = Ctl(a.bin, a.ctl)
    eps = [int(e, 0) for e in a.eps.split(",") if int(e, 0)]
    evs = events(a.events, lambda evs: len(table_events(evs, "table-unbound", a.pasid)) >= len(eps))
    ok, detail = unbind_order(read_log(a.log), evs, eps, a.pasid)
    tables = ctl("pasid-tables")["tables"]
    held = [p["host"] for p in ctl("pasids")["pasids"]]
    if not ok or tables or held:
        raise CheckFailed(f"{detail}; still bound {json.dumps(tables)}; PASIDs held {held}")
    return f"PASID {a.pasid}: {detail}; nothing bound, no PASID held"


def check_store_clean(a):
    """After the daemon's clean exit, the host-wide PASID store holds no
    set with PASIDs (the exit returned the VM's set)."""
    cmd = [a.bin, "pasid-admin", "--state-dir", a.state_dir, "list", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    if p.returncode != 0:
        raise CheckFailed(f"pasid-admin list exited {p.returncode}: {p.stderr.strip()[-200:]}")
    sets = json.loads(p.stdout)["sets"]
    leaked = [s for s in sets if s["pasids"] or s["leased"]]
    if leaked:
        raise CheckFailed(f"sets left in {a.state_dir}: {json.dumps(leaked)}")
    return f"pasid-admin list: {len(sets)} set(s) left in the store, none with a PASID or a lease"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="check", required=True)

    def add(name, fn, *opts):
        sp = sub.add_parser(name)
        sp.set_defaults(fn=fn)
        if "ctl" in opts:
            sp.add_argument("--bin", required=True)
            sp.add_argument("--ctl", required=True)
        return sp

    sp = add("attached", check_attached, "ctl")
    sp.add_argument("--endpoint", type=int, action="append", required=True)
    sp = add("probe", check_probe, "ctl")
    sp.add_argument("--min", type=int, required=True)
    sp = add("mappings", check_mappings, "ctl")
    sp.add_argument("--console", required=True)
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--save-domain", required=True)
    sp = add("translate", check_translate, "ctl")
    sp.add_argument("--console", required=True)
    sp.add_argument("--endpoint", type=int, required=True)
    sp = add("dma-translate", check_dma_translate, "ctl")
    sp.add_argument("--console", required=True)
    sp.add_argument("--endpoint", type=int, required=True)
    sp = add("dma-faults", check_dma_faults, "ctl")
    sp.add_argument("--expect", type=int, required=True)
    sp = add("unmapped", check_unmapped, "ctl")
    sp.add_argument("--console", required=True)
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--domain-file", required=True)
    sp.add_argument("--stats-before", required=True)
    sp = add("stat-delta", check_stat_delta, "ctl")
    sp.add_argument("--stats-before", required=True)
    sp.add_argument("--key", required=True)
    sp.add_argument("--min", type=int, required=True)
    sp = add("fault", check_fault, "ctl")
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--address", required=True)
    sp = add("fault-seen", check_fault_seen)
    sp.add_argument("--console", required=True)
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--address", required=True)
    sp = add("unplugged", check_unplugged, "ctl")
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--stats-before", required=True)
    sp = add("bypass", check_bypass, "ctl")
    sp.add_argument("--endpoint", type=int, required=True)
    sp = add("identity", check_identity, "ctl")
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--input-bits", type=int, default=48)
    sp = add("health", check_health, "ctl")
    sp.add_argument("--pid", type=int, required=True)
    sp.add_argument("--log", required=True)
    sp = add("pasids", check_pasids, "ctl")
    sp.add_argument("--console")
    sp.add_argument("--none", action="store_true")
    sp = add("watch", watch)
    sp.add_argument("--ctl", required=True)
    sp.add_argument("--out", required=True)
    sp = add("sva-bound", check_sva_bound, "ctl")
    sp.add_argument("--pasid", type=int, required=True)
    sp.add_argument("--domain", type=int, required=True)
    sp.add_argument("--eps", required=True)
    sp.add_argument("--addr-width", type=int, required=True)
    sp.add_argument("--events", required=True)
    sp = add("stats-save", check_stats_save, "ctl")
    sp.add_argument("--out", required=True)
    sp = add("pr-counts", check_pr_counts, "ctl")
    sp.add_argument("--before")
    sp.add_argument("--guest", required=True)
    sp.add_argument("--exact-groups", type=int)
    sp = add("invalidated", check_invalidated)
    sp.add_argument("--events", required=True)
    sp.add_argument("--pasid", type=int, required=True)
    sp.add_argument("--addr", type=lambda v: int(v, 0), required=True)
    sp.add_argument("--len", type=lambda v: int(v, 0), required=True)
    sp = add("child-gone", check_child_gone, "ctl")
    sp.add_argument("--pasid", type=int, required=True)
    sp.add_argument("--parent", type=int, required=True)
    sp.add_argument("--endpoint", type=int, required=True)
    sp.add_argument("--events", required=True)
    sp.add_argument("--log", required=True)
    sp = add("unbound", check_unbound, "ctl")
    sp.add_argument("--pasid", type=int, required=True)
    sp.add_argument("--eps", required=True)
    sp.add_argument("--events", required=True)
    sp.add_argument("--log", required=True)
    sp = add("store-clean", check_store_clean)
    sp.add_argument("--bin", required=True)
    sp.add_argument("--state-dir", required=True)
    sp = add("unplug", check_unplug_qmp)
    sp.add_argument("--qmp", required=True)
    sp.add_argument("--id", required=True)
    sp.add_argument("--timeout", type=float, default=20)

    a = p.parse_args()
    try:
        print("PASS " + a.fn(a))
    except CheckFailed as e:
        print(f"FAIL {e}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"FAIL {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
