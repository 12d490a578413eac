#!/usr/bin/env python3
# ci/hostcheck.py: host-side checks of ci/guest-tests.sh.
#
# Owns: judging the daemon's state, read through its control plane
# (`vhost-device-iommu ctl --control-socket SOCK ... --json`), against what
# the guest reported on its console; and a minimal QMP client for the
# hot-unplug.  Every check prints exactly one line, "PASS <detail>" or
# "FAIL <detail>", and exits 0 (the runner counts the verdicts); a usage
# error exits 2.  Python standard library only.
#
# Usage: hostcheck.py CHECK [ARGS...]   (see the dispatch table at the end)
# Common options: --bin DAEMON_BINARY --ctl CONTROL_SOCKET

import argparse
import json
import re
import socket
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
