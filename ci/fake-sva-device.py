#!/usr/bin/env python3
# ci/fake-sva-device.py: a scripted virtio-iommu with the extension profile,
# for testing the guest SVA module (guest/sva/) before the daemon has it.
#
# Owns: a minimal vhost-user backend (split rings without indirect
# descriptors or EVENT_IDX, protocol features MQ + CONFIG) that QEMU's
# vhost-user-test-device-pci drives like the real daemon, and a device
# model of the profile's PASID side: PROBE (PASID_SIZE, OUTPUT_SIZE,
# PAGE_TABLE_FMT PGTF_VTD, PAGE_REQUEST), PASID_ALLOC/FREE, ATTACH_TABLE
# (PGTF_VTD, per PASID), DETACH_TABLE (auto-answers the PASID's groups),
# INVALIDATE, PAGE_RESP (exactly once per group, S_NOENT otherwise), the
# 48-byte page-request records on the event queue, and an emulated PASID
# DMA engine that walks the bound IA-32e tables (4/5 levels, U/S and R/W
# checked, A/D set) and raises a page request per missing page, as the
# project's DMA test device will through the daemon.  It is test-only: the
# checks it enables are ci/sva-tests.sh's "fake" boots.
#
#   fake-sva-device.py serve --socket S --control C --log L [--endpoints 40,41]
#       serves; every request is logged to L (one JSON object per line)
#   fake-sva-device.py drive --control C --console F --hostline H --log L
#       the host side of ci/guest/sva-fake-test.sh: answers its VDI-WAIT
#       steps (running DMA and events through the control socket) and
#       prints one "PASS|FAIL <check> <detail>" line per host-side check
#
# Control socket: one JSON request per line, one JSON reply per line
# ({"cmd": "dma", ...}, "events", "state", "stall"); see Control below.
# Python standard library only.

import argparse
import array
import json
import mmap
import os
import selectors
import socket
import struct
import sys
import threading
import time

# --- vhost-user ------------------------------------------------------------

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 15, 16, 17
SET_VRING_ENABLE, GET_CONFIG, SET_CONFIG = 18, 24, 25
PROTO_MQ, PROTO_CONFIG = 1 << 0, 1 << 9
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32

# --- the device ------------------------------------------------------------

F_INPUT_RANGE, F_DOMAIN_RANGE, F_MAP_UNMAP, F_PROBE = 0, 1, 2, 4
F_ATTACH_TABLE, F_PAGE_REQUEST, F_PASID_ALLOC = 8, 10, 11
DEVICE_FEATURES = sum(1 << b for b in (F_INPUT_RANGE, F_DOMAIN_RANGE, F_MAP_UNMAP, F_PROBE,
                                         F_ATTACH_TABLE, F_PAGE_REQUEST, F_PASID_ALLOC))
T_PROBE, T_ATTACH_TABLE, T_INVALIDATE, T_PAGE_RESP = 5, 6, 7, 8
T_DETACH_TABLE, T_PASID_ALLOC, T_PASID_FREE = 9, 10, 11
S_OK, S_IOERR, S_UNSUPP, S_DEVERR, S_INVAL, S_RANGE, S_NOENT = 0, 1, 2, 3, 4, 5, 6
PGTF_VTD = 4
PASID_BITS = 20
PROBE_SIZE = 512
# The guest's SVA domains must come from the top of this range.
DOMAIN_RANGE = (16, 4095)
R_MAPPING = 2
FL_READ, FL_WRITE, FL_EXEC, FL_PRIV, FL_LAST, FL_PAGE_REQ = 1, 2, 4, 8, 16, 32
FL_ADDRESS, FL_PASID, FL_GROUP_ID = 1 << 8, 1 << 9, 1 << 10
RESP_SUCCESS, RESP_INVALID = 0, 1
PAGE = 4096


class Memory:
    """Guest memory from SET_MEM_TABLE: GPA and frontend-VA lookups."""

    def __init__(self):
        self.regions = []   # (gpa, size, uaddr, mmap, offset)

    def set(self, regions, fds):
        for r in self.regions:
            r[3].close()
        self.regions = []
        for (gpa, size, uaddr, off), fd in zip(regions, fds):
            m = mmap.mmap(fd, size + off, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            self.regions.append((gpa, size, uaddr, m, off))

    def _find(self, addr, n, by_uaddr):
        for gpa, size, uaddr, m, off in self.regions:
            base = uaddr if by_uaddr else gpa
            if base <= addr and addr + n <= base + size:
                return m, off + addr - base
        raise ValueError(f"address {addr:#x}+{n} outside guest memory")

    def gpa_of_uaddr(self, ua):
        for gpa, size, uaddr, _m, _off in self.regions:
            if uaddr <= ua < uaddr + size:
                return gpa + ua - uaddr
        raise ValueError(f"frontend address {ua:#x} outside guest memory")

    def read(self, gpa, n):
        m, o = self._find(gpa, n, False)
        return m[o:o + n]

    def write(self, gpa, data):
        m, o = self._find(gpa, len(data), False)
        m[o:o + len(data)] = data

    def u16(self, gpa):
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def u64(self, gpa):
        return struct.unpack("<Q", self.read(gpa, 8))[0]


class Vring:
    def __init__(self, idx):
        self.idx = idx
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.kick = None
        self.call = None
        self.enabled = False
        self.ready = False

    def pop(self, mem):
        """Next available chain as (head, [(gpa, len, writable)]) or None."""
        if not self.ready or self.last_avail == mem.u16(self.avail + 2):
            return None
        head = mem.u16(self.avail + 4 + 2 * (self.last_avail % self.num))
        self.last_avail = (self.last_avail + 1) & 0xffff
        chain, i, n = [], head, 0
        while True:
            addr, ln, flags, nxt = struct.unpack("<QIHH", mem.read(self.desc + 16 * i, 16))
            chain.append((addr, ln, bool(flags & 2)))
            n += 1
            if not flags & 1 or n > self.num:
                break
            i = nxt
        return head, chain

    def push(self, mem, head, length):
        if not self.ready:
            return
        slot = self.used + 4 + 8 * (self.used_idx % self.num)
        mem.write(slot, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xffff
        mem.write(self.used + 2, struct.pack("<H", self.used_idx))
        if self.call is not None:
            os.write(self.call, struct.pack("<Q", 1))


class Device:
    """The profile's PASID side.  Every method runs under self.lock."""

    def __init__(self, endpoints, logf):
        self.lock = threading.Condition()
        self.endpoints = set(endpoints)
        self.logf = logf
        self.mem = Memory()
        self.vrings = [Vring(0), Vring(1)]
        self.features = 0
        self.pasids = set()
        self.bindings = {}          # (ep, pasid) -> dict(domain, pgd, aw, fl)
        self.groups = {}            # (ep, pasid|None, group) -> None | code
        self.pending_events = []
        self.stalled = []           # (release_time, head, chain)
        self.stall_until = 0.0
        self.stall_types = None
        self.next_group = 0
        self.log = []

    def record(self, **kv):
        kv["t"] = round(time.monotonic(), 6)
        self.log.append(kv)
        self.logf.write(json.dumps(kv) + "\n")
        self.logf.flush()

    # ----- request queue -----

    def process_requests(self):
        vq = self.vrings[0]
        now = time.monotonic()
        keep = []
        for rel, head, chain in self.stalled:
            if rel <= now:
                self.complete(head, chain)
            else:
                keep.append((rel, head, chain))
        self.stalled = keep
        while True:
            c = vq.pop(self.mem)
            if c is None:
                break
            head, chain = c
            ro = b"".join(self.mem.read(a, n) for a, n, w in chain if not w)
            if now < self.stall_until and (self.stall_types is None or ro[:1] and ro[0] in self.stall_types):
                self.stalled.append((self.stall_until, head, chain))
                continue
            self.complete(head, chain)

    def complete(self, head, chain):
        ro = b"".join(self.mem.read(a, n) for a, n, w in chain if not w)
        wlen = sum(n for a, n, w in chain if w)
        reply = self.handle(ro, wlen)
        if reply is None:
            self.vrings[0].push(self.mem, head, 0)
            return
        reply = reply.ljust(wlen, b"\0")[:wlen]
        off = 0
        for a, n, w in chain:
            if w:
                self.mem.write(a, reply[off:off + n])
                off += n
        self.vrings[0].push(self.mem, head, wlen)

    def handle(self, ro, wlen):
        if wlen < 4 or not ro:
            self.record(req="malformed", ro=len(ro), wlen=wlen)
            return None
        t = ro[0]
        fn = {T_PROBE: self.probe, T_ATTACH_TABLE: self.attach_table,
              T_INVALIDATE: self.invalidate, T_PAGE_RESP: self.page_resp,
              T_DETACH_TABLE: self.detach_table, T_PASID_ALLOC: self.pasid_alloc,
              T_PASID_FREE: self.pasid_free}.get(t)
        if fn is None:
            self.record(req="unknown", type=t)
            return None
        payload, status = fn(ro, wlen)
        return payload.ljust(wlen - 4, b"\0") + bytes([status, 0, 0, 0])

    def probe(self, ro, wlen):
        (ep,) = struct.unpack_from("<I", ro, 4)
        self.record(req="PROBE", endpoint=ep)
        if wlen - 4 < PROBE_SIZE:
            return b"", S_INVAL
        if ep not in self.endpoints:
            return b"", S_NOENT
        props = struct.pack("<HHB3xQQ", 1, 20, 1, 0xFEE00000, 0xFEEFFFFF)
        props += struct.pack("<HHB3x", 4, 4, 48)
        props += struct.pack("<HHB3x", 5, 4, PASID_BITS)
        cap = (1 << 60) | (1 << 56)   # FL5LP, FL1GP
        props += struct.pack("<HHH2xQQ", 6, 20, PGTF_VTD, cap, 1 << 40)
        props += struct.pack("<HHII4x", 8, 12, 0x3, 64)
        return props, S_OK

    def pasid_alloc(self, ro, wlen):
        lo, hi, flags = struct.unpack_from("<III", ro, 4)
        self.record(req="PASID_ALLOC", min=lo, max=hi, flags=flags)
        if flags or wlen < 12:
            return b"", S_INVAL
        if lo == 0 or lo > hi or hi >= 1 << PASID_BITS:
            return b"", S_RANGE
        for p in range(lo, hi + 1):
            if p not in self.pasids:
                self.pasids.add(p)
                self.record(event="pasid_allocated", pasid=p)
                return struct.pack("<I4x", p), S_OK
        return b"", 8

    def pasid_free(self, ro, wlen):
        pasid, flags = struct.unpack_from("<II", ro, 4)
        bound = [k for k in self.bindings if k[1] == pasid]
        self.record(req="PASID_FREE", pasid=pasid, flags=flags, still_bound=len(bound))
        if flags:
            return b"", S_INVAL
        if pasid not in self.pasids:
            return b"", S_NOENT
        if bound:
            return b"", S_INVAL
        self.pasids.discard(pasid)
        return b"", S_OK

    def attach_table(self, ro, wlen):
        if len(ro) < 44:
            self.record(req="ATTACH_TABLE", short=len(ro))
            return b"", S_INVAL
        dom, ep, flags, fmt = struct.unpack_from("<IIIH", ro, 4)
        pasid, pgd, fl, aw = struct.unpack_from("<IQQI", ro, 20)
        rest_zero = not any(ro[44:]) and ro[18:20] == b"\0\0"
        self.record(req="ATTACH_TABLE", domain=dom, endpoint=ep, flags=flags, format=fmt,
                    pasid=pasid, pgd=pgd, fl_flags=fl, addr_width=aw, ro_len=len(ro),
                    reserved_zero=rest_zero)
        if flags or fmt != PGTF_VTD or not rest_zero or aw not in (48, 57) or pgd & 0xfff:
            return b"", S_INVAL
        if ep not in self.endpoints:
            return b"", S_NOENT
        if not DOMAIN_RANGE[0] <= dom <= DOMAIN_RANGE[1]:
            return b"", S_RANGE
        if pasid == 0 or pasid not in self.pasids:
            return b"", S_INVAL
        for (e, p), b in self.bindings.items():
            if p == pasid and b["domain"] != dom:
                self.record(event="domain_mismatch", pasid=pasid, domain=dom, other=b["domain"])
                return b"", S_INVAL
        self.bindings[(ep, pasid)] = dict(domain=dom, pgd=pgd, aw=aw, fl=fl)
        return b"", S_OK

    def detach_table(self, ro, wlen):
        dom, ep, pasid, flags = struct.unpack_from("<IIII", ro, 4)
        auto = [k for k, v in self.groups.items() if k[0] == ep and k[1] == pasid and v is None]
        for k in auto:
            self.groups[k] = "auto-invalid"
        self.record(req="DETACH_TABLE", domain=dom, endpoint=ep, pasid=pasid, flags=flags,
                    auto_answered=len(auto))
        self.lock.notify_all()
        b = self.bindings.get((ep, pasid))
        if flags or any(ro[20:28]):
            return b"", S_INVAL
        if b is None:
            return b"", S_NOENT
        if b["domain"] != dom:
            return b"", S_INVAL
        del self.bindings[(ep, pasid)]
        return b"", S_OK

    def invalidate(self, ro, wlen):
        gran, typ, flags, dom, pasid, archid, start, npages, granule = struct.unpack_from(
            "<HHH2xII4xQQQB", ro, 4)
        self.record(req="INVALIDATE", gran=gran, type=typ, flags=flags, domain=dom, pasid=pasid,
                    archid=archid, virt_start=start, nr_pages=npages, granule=granule)
        if gran not in (1, 2, 4) or (gran in (2, 4) and not flags & 1):
            return b"", S_INVAL
        if gran == 4 and (npages == 0 or granule != 12):
            return b"", S_INVAL
        if not any(b["domain"] == dom for b in self.bindings.values()):
            return b"", S_NOENT
        return b"", S_OK

    def page_resp(self, ro, wlen):
        ep, pasid, flags, group, code = struct.unpack_from("<IIIHH", ro, 4)
        key = (ep, pasid if flags & 1 else None, group)
        state = self.groups.get(key, "unknown")
        self.record(req="PAGE_RESP", endpoint=ep, pasid=pasid, flags=flags, group=group,
                    code=code, group_state=state)
        if flags & ~1 or any(ro[20:28]) or (not flags & 1 and pasid) or code > 2:
            return b"", S_INVAL
        if state is not None:
            return b"", S_NOENT
        self.groups[key] = code
        self.lock.notify_all()
        return b"", S_OK

    # ----- event queue -----

    def post_event(self, rec):
        self.pending_events.append(rec)
        self.flush_events()

    def flush_events(self):
        vq = self.vrings[1]
        while self.pending_events:
            c = vq.pop(self.mem)
            if c is None:
                return
            head, chain = c
            rec = self.pending_events.pop(0)
            a, n, w = chain[0]
            if not w or n < len(rec):
                self.record(event="event_buffer_unusable", len=n)
                vq.push(self.mem, head, 0)
                continue
            self.mem.write(a, rec)
            vq.push(self.mem, head, len(rec))

    def page_request(self, ep, pasid, addr, write, group, last=True, read=True, extra=0):
        flags = FL_PAGE_REQ | FL_ADDRESS | FL_GROUP_ID | extra
        if pasid is not None:
            flags |= FL_PASID
        if read:
            flags |= FL_READ
        if write:
            flags |= FL_WRITE
        if last:
            flags |= FL_LAST
            self.groups[(ep, pasid, group)] = None
        rec = struct.pack("<B3xIIIQH6xQQ", R_MAPPING, flags, ep, pasid or 0, addr & ~0xfff,
                          group, 0, 0)
        self.post_event(rec)

    def alloc_group(self, ep, pasid):
        for _ in range(512):
            g = self.next_group
            self.next_group = (self.next_group + 1) % 512
            if self.groups.get((ep, pasid, g), "free") is not None:
                return g
        raise RuntimeError("no free group ID")

    def wait_group(self, key, timeout):
        end = time.monotonic() + timeout
        while self.groups.get(key) is None:
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.lock.wait(left)
        return self.groups[key]

    # ----- the emulated PASID DMA engine -----

    def walk(self, ep, pasid, va, write):
        """(gpa, None) or (None, why): an IA-32e walk of the bound table."""
        b = self.bindings.get((ep, pasid))
        if b is None:
            return None, "not bound"
        levels = 5 if b["aw"] == 57 else 4
        table = b["pgd"]
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            slot = table + 8 * ((va >> shift) & 0x1ff)
            e = self.mem.u64(slot)
            if not e & 1:
                return None, f"not present at level {level}"
            if not e & 4:
                return None, f"supervisor page at level {level}"
            if write and not e & 2:
                return None, f"read-only at level {level}"
            leaf = level == 1 or (level in (2, 3) and e & 0x80)
            want = e | 0x20 | (0x40 if write and leaf else 0)
            if want != e:
                self.mem.write(slot, struct.pack("<Q", want))
            addr = e & 0x000FFFFFFFFFF000
            if leaf:
                size = 1 << shift
                return (addr & ~(size - 1)) + (va & (size - 1)), None
            table = addr
        return None, "no leaf"

    def dma(self, ep, pasid, va, length, write, data_byte, timeout):
        """A device operation at (PASID, VA): page by page, with page
        requests for what the walk does not find."""
        done, requests, out = 0, 0, bytearray()
        while done < length:
            cur = va + done
            n = min(length - done, PAGE - (cur & 0xfff))
            gpa, why = self.walk(ep, pasid, cur, write)
            if gpa is None:
                g = self.alloc_group(ep, pasid)
                self.page_request(ep, pasid, cur, write, g)
                requests += 1
                code = self.wait_group((ep, pasid, g), timeout)
                if code != RESP_SUCCESS:
                    return dict(status="fault", fault_addr=cur, done=done, requests=requests,
                                code=code, why=why)
                gpa, why = self.walk(ep, pasid, cur, write)
                if gpa is None:
                    return dict(status="fault", fault_addr=cur, done=done, requests=requests,
                                code="walk after SUCCESS", why=why)
            if write:
                self.mem.write(gpa, bytes([data_byte]) * n)
            else:
                out += self.mem.read(gpa, n)
            done += n
        r = dict(status="done", done=done, requests=requests)
        if not write:
            r["sum"] = sum(out) & 0xffffffff
        return r


class Server:
    def __init__(self, dev, sock_path, ctl_path):
        self.dev = dev
        self.sel = selectors.DefaultSelector()
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(sock_path)
        self.ls.listen(1)
        self.cs = socket.socket(socket.AF_UNIX)
        self.cs.bind(ctl_path)
        self.cs.listen(4)
        self.conn = None
        self.protocol_features = 0

    # ----- vhost-user messages -----

    def recv_msg(self):
        fds = array.array("i")
        hdr, anc, _flags, _addr = self.conn.recvmsg(12, socket.CMSG_SPACE(8 * 4))
        if len(hdr) < 12:
            return None
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        req, flags, size = struct.unpack("<III", hdr)
        body = b""
        while len(body) < size:
            chunk = self.conn.recv(size - len(body))
            if not chunk:
                return None
            body += chunk
        return req, flags, body, list(fds)

    def reply(self, req, body):
        self.conn.sendall(struct.pack("<III", req, 0x5, len(body)) + body)

    def vring_fd(self, body, fds):
        (u,) = struct.unpack("<Q", body[:8])
        return self.dev.vrings[u & 0xff], (None if u & 0x100 or not fds else fds[0])

    def handle_msg(self, req, flags, body, fds):
        dev = self.dev
        if req == GET_FEATURES:
            self.reply(req, struct.pack("<Q", F_VERSION_1 | F_PROTOCOL_FEATURES | DEVICE_FEATURES))
        elif req == SET_FEATURES:
            dev.features = struct.unpack("<Q", body[:8])[0]
            dev.record(req="vhost-features", features=dev.features)
        elif req == GET_PROTOCOL_FEATURES:
            self.reply(req, struct.pack("<Q", PROTO_MQ | PROTO_CONFIG))
        elif req == SET_PROTOCOL_FEATURES:
            self.protocol_features = struct.unpack("<Q", body[:8])[0]
        elif req == GET_QUEUE_NUM:
            self.reply(req, struct.pack("<Q", 2))
        elif req in (SET_OWNER, RESET_OWNER):
            pass
        elif req == SET_MEM_TABLE:
            n = struct.unpack_from("<I", body)[0]
            regions = [struct.unpack_from("<QQQQ", body, 8 + 32 * i) for i in range(n)]
            dev.mem.set(regions, fds)
            fds = []
        elif req == SET_VRING_NUM:
            i, num = struct.unpack("<II", body[:8])
            dev.vrings[i].num = num
        elif req == SET_VRING_ADDR:
            i, _fl, d, u, a, _log = struct.unpack("<IIQQQQ", body[:40])
            vq = dev.vrings[i]
            vq.desc, vq.used, vq.avail = (dev.mem.gpa_of_uaddr(x) for x in (d, u, a))
            vq.used_idx = dev.mem.u16(vq.used + 2)
        elif req == SET_VRING_BASE:
            i, base = struct.unpack("<II", body[:8])
            dev.vrings[i].last_avail = base
        elif req == GET_VRING_BASE:
            i = struct.unpack("<I", body[:4])[0]
            vq = dev.vrings[i]
            vq.ready = False
            if vq.kick is not None:
                self.sel.unregister(vq.kick)
                os.close(vq.kick)
                vq.kick = None
            self.reply(req, struct.pack("<II", i, vq.last_avail))
            if i == 0:
                # A device reset: stalled requests are never completed
                # into rings the guest may already have freed.
                dev.record(event="device stopped", pasids=sorted(dev.pasids),
                           bindings=len(dev.bindings), stalled=len(dev.stalled))
                dev.stalled.clear()
                dev.pasids.clear()
                dev.bindings.clear()
        elif req == SET_VRING_KICK:
            vq, fd = self.vring_fd(body, fds)
            fds = []
            if vq.kick is not None:
                self.sel.unregister(vq.kick)
                os.close(vq.kick)
            vq.kick = fd
            if fd is not None:
                self.sel.register(fd, selectors.EVENT_READ, ("kick", vq))
            vq.ready = True
            if not self.protocol_features:
                vq.enabled = True
        elif req == SET_VRING_CALL:
            vq, fd = self.vring_fd(body, fds)
            fds = []
            if vq.call is not None:
                os.close(vq.call)
            vq.call = fd
        elif req == SET_VRING_ERR:
            pass
        elif req == SET_VRING_ENABLE:
            i, on = struct.unpack("<II", body[:8])
            dev.vrings[i].enabled = bool(on)
        elif req == GET_CONFIG:
            off, size, _fl = struct.unpack_from("<III", body)
            cfg = struct.pack("<QQQIIIB3x", 0xFFFFFFFFFFFFF000, 0, (1 << 48) - 1,
                              DOMAIN_RANGE[0], DOMAIN_RANGE[1], PROBE_SIZE, 1)
            self.reply(req, body[:12] + cfg[off:off + size].ljust(size, b"\0"))
        elif req == SET_CONFIG:
            pass
        else:
            dev.record(req="vhost-unknown", code=req)
            if flags & 0x8:
                self.reply(req, struct.pack("<Q", 0))
        for fd in fds:
            os.close(fd)

    def run(self):
        self.sel.register(self.ls, selectors.EVENT_READ, ("listen", None))
        self.sel.register(self.cs, selectors.EVENT_READ, ("ctl-listen", None))
        while True:
            with self.dev.lock:
                timeout = 0.05 if self.dev.stalled else None
            for key, _ in self.sel.select(timeout):
                kind, obj = key.data
                if kind == "listen":
                    self.conn, _ = self.ls.accept()
                    self.sel.register(self.conn, selectors.EVENT_READ, ("vhost", None))
                elif kind == "ctl-listen":
                    c, _ = self.cs.accept()
                    threading.Thread(target=Control(self.dev, c).run, daemon=True).start()
                elif kind == "vhost":
                    m = self.recv_msg()
                    if m is None:
                        self.dev.record(event="frontend gone")
                        return
                    with self.dev.lock:
                        self.handle_msg(*m)
                elif kind == "kick":
                    try:
                        os.read(key.fd, 8)
                    except BlockingIOError:
                        pass
                    with self.dev.lock:
                        if obj.idx == 0:
                            self.dev.process_requests()
                        else:
                            self.dev.flush_events()
            with self.dev.lock:
                if self.dev.stalled:
                    self.dev.process_requests()


class Control:
    """One control connection: JSON requests, JSON replies."""

    def __init__(self, dev, conn):
        self.dev = dev
        self.f = conn.makefile("rw")

    def run(self):
        for line in self.f:
            try:
                r = self.dispatch(json.loads(line))
            except Exception as e:   # a test helper: report, do not die
                r = dict(error=f"{type(e).__name__}: {e}")
            self.f.write(json.dumps(r) + "\n")
            self.f.flush()

    def dispatch(self, q):
        dev = self.dev
        cmd = q["cmd"]
        with dev.lock:
            if cmd == "dma":
                return dev.dma(q["ep"], q["pasid"], q["addr"], q["len"], q.get("write", True),
                               q.get("byte", 0), q.get("timeout", 10))
            if cmd == "state":
                return dict(pasids=sorted(dev.pasids),
                            bindings=[dict(ep=e, pasid=p, **b) for (e, p), b in dev.bindings.items()],
                            open_groups=[list(k) for k, v in dev.groups.items() if v is None],
                            features=dev.features)
            if cmd == "group":
                # Records of one group; only the last carries LAST.
                ep, pasid = q["ep"], q["pasid"]
                g = dev.alloc_group(ep, pasid)
                pages = q["pages"]
                for i, (addr, write) in enumerate(pages):
                    dev.page_request(ep, pasid, addr, write, g, last=i == len(pages) - 1)
                code = dev.wait_group((ep, pasid, g), q.get("timeout", 5))
                return dict(group=g, code=code)
            if cmd == "open_request":
                # The first record of a group whose LAST never comes: the
                # device holds it open until DETACH_TABLE answers it.
                ep, pasid = q["ep"], q["pasid"]
                g = dev.alloc_group(ep, pasid)
                dev.page_request(ep, pasid, q["addr"], q.get("write", True), g, last=False)
                dev.groups[(ep, pasid, g)] = None
                return dict(group=g)
            if cmd == "wait_group":
                code = dev.wait_group(tuple(q["key"]), q.get("timeout", 5))
                return dict(code=code)
            if cmd == "raw_event":
                dev.post_event(bytes.fromhex(q["hex"]))
                return dict(ok=True)
            if cmd == "stop_marker":
                flags = FL_PAGE_REQ | FL_ADDRESS | FL_GROUP_ID | FL_PASID | FL_LAST
                g = dev.alloc_group(q["ep"], q["pasid"])
                dev.post_event(struct.pack("<B3xIIIQH6xQQ", R_MAPPING, flags, q["ep"],
                                           q["pasid"], 0, g, 0, 0))
                return dict(group=g)
            if cmd == "fault":
                dev.post_event(struct.pack("<B3xIIIQH6xQQ", R_MAPPING,
                                           FL_WRITE | FL_ADDRESS | FL_PASID, q["ep"],
                                           q["pasid"], q["addr"], 0, 0, 0))
                return dict(ok=True)
            if cmd == "stall":
                dev.stall_until = time.monotonic() + q["ms"] / 1000
                dev.stall_types = set(q["types"]) if q.get("types") else None
                return dict(ok=True)
            if cmd == "log":
                return dict(log=dev.log[q.get("from", 0):])
        return dict(error=f"unknown command {cmd}")


# --- the host side of ci/guest/sva-fake-test.sh ------------------------------

class Driver:
    def __init__(self, a):
        self.console = a.console
        self.hostline = a.hostline
        self.timeout = a.timeout
        s = socket.socket(socket.AF_UNIX)
        s.connect(a.control)
        self.ctl = s.makefile("rw")
        self.answered = 0
        self.failed = 0

    def q(self, **kv):
        self.ctl.write(json.dumps(kv) + "\n")
        self.ctl.flush()
        return json.loads(self.ctl.readline())

    def verdict(self, ok, check, detail):
        print(f"{'PASS' if ok else 'FAIL'} {check} {detail}", flush=True)
        self.failed += not ok

    def go(self, text="go"):
        with open(self.hostline, "w") as f:
            f.write(text + "\n")

    def log_since(self, mark):
        return self.q(cmd="log", **{"from": mark})["log"]

    def mark(self):
        return len(self.q(cmd="log", **{"from": 0})["log"])

    def waits(self):
        """VDI-WAIT steps as they appear: (step, {key: value})."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while time.monotonic() < deadline:
            with open(self.console, "rb") as f:
                lines = f.read().decode("utf-8", "replace").replace("\r", "").splitlines()
            waits = [l for l in lines if l.startswith("VDI-WAIT ")]
            if any(l.startswith("VDI-DONE") for l in lines) and len(waits) <= seen:
                return
            while seen < len(waits):
                parts = waits[seen].split()
                seen += 1
                yield parts[1], dict(p.split("=", 1) for p in parts[2:] if "=" in p)
            time.sleep(0.05)
        print(f"FAIL fake-driver the guest did not finish within {self.timeout}s", flush=True)
        self.failed += 1

    def run(self):
        mark = 0
        for step, kv in self.waits():
            num = {k: int(v, 0) for k, v in kv.items() if v[:1].isdigit()}
            reply = "go"
            if step == "bind":
                log = self.log_since(mark)
                at = [e for e in log if e.get("req") == "ATTACH_TABLE"]
                ok = (len(at) == 2 and all(e["format"] == PGTF_VTD and e["flags"] == 0 and
                                           e["fl_flags"] == 0 and e["addr_width"] in (48, 57) and
                                           e["pgd"] and not e["pgd"] & 0xfff and e["reserved_zero"] and
                                           e["ro_len"] == 80 and e["pasid"] == num["pasid"] and
                                           e["domain"] == DOMAIN_RANGE[1] for e in at) and
                      {e["endpoint"] for e in at} == {num["ep"], num["ep2"]})
                self.verdict(ok, "attach-table", f"{len(at)} ATTACH_TABLE: " + json.dumps(
                    [{k: e[k] for k in ("endpoint", "domain", "pasid", "pgd", "addr_width", "fl_flags")}
                     for e in at]))
            elif step == "dma":
                r = self.q(cmd="dma", ep=num["ep"], pasid=num["pasid"], addr=num["addr"],
                           len=num["len"], write=bool(num.get("write", 1)), byte=num.get("byte", 0))
                reply = "go " + " ".join(f"{k}={v}" for k, v in r.items() if k != "why")
                if r.get("why"):
                    reply += " why=" + r["why"].replace(" ", "_")
            elif step == "invalidate":
                log = self.log_since(mark)
                inv = [e for e in log if e.get("req") == "INVALIDATE" and e["pasid"] == num["pasid"]]
                lo, hi = num["addr"], num["addr"] + num["len"]
                cover = [e for e in inv if e["gran"] == 2 or
                         (e["gran"] == 4 and e["virt_start"] <= lo and
                          e["virt_start"] + e["nr_pages"] * PAGE >= hi)]
                ok = bool(cover) and all(e["flags"] == 1 and e["type"] == 3 and e["granule"] == 12
                                         for e in inv)
                self.verdict(ok, "invalidate-munmap", f"{len(inv)} INVALIDATE for pasid {num['pasid']}, "
                             f"covering [{lo:#x}, {hi:#x}): " + json.dumps(cover[:2]))
            elif step == "events":
                ep, pasid, addr = num["ep"], num["pasid"], num["addr"]
                good = [(addr + i * PAGE, True) for i in range(3)]
                r1 = self.q(cmd="group", ep=ep, pasid=pasid, pages=good)
                r2 = self.q(cmd="group", ep=ep, pasid=pasid,
                            pages=[good[0], (num["hole"], True), good[1]])
                r3 = self.q(cmd="group", ep=ep, pasid=pasid + 1000, pages=[good[0]])
                sm = self.q(cmd="stop_marker", ep=ep, pasid=pasid)
                self.q(cmd="fault", ep=ep, pasid=pasid, addr=0xdead0000)
                bad = ["00" * 16,                                           # 16 bytes
                       "00ff0000" + "00" * 44,                              # reserved byte set
                       "02000000" + "21010000" + "28000000" + "00" * 12,   # PAGE_REQ in 24 bytes
                       "ff" * 64]                                           # 64 bytes of junk
                for h in bad:
                    self.q(cmd="raw_event", hex=h)
                time.sleep(0.5)
                st = self.q(cmd="state")
                stop_answered = [k for k in st["open_groups"]]
                ok = r1["code"] == RESP_SUCCESS and r2["code"] == RESP_INVALID and \
                    r3["code"] == RESP_INVALID
                self.verdict(ok, "page-groups", f"3-page group SUCCESS ({r1}), group with an "
                             f"unmapped page INVALID ({r2}), unbound PASID INVALID ({r3}); "
                             f"stop marker group {sm['group']} not answered; open groups {stop_answered}")
                log = self.log_since(mark)
                resp = [e for e in log if e.get("req") == "PAGE_RESP"]
                self.verdict(len(resp) == 3 and all(e["group_state"] is None for e in resp),
                             "page-resp-once", f"{len(resp)} PAGE_RESP for 3 raised groups (8 records, "
                             f"a stop marker, a fault, 4 bad records): " +
                             json.dumps([(e["group"], e["code"], e["flags"]) for e in resp]))
            elif step == "child":
                # A request of the child's left unanswered: its exit must
                # detach (auto-answering it) before the PASID is freed.
                r = self.q(cmd="open_request", ep=num["ep"], pasid=num["pasid"], addr=num["addr"])
                self.child = (num["ep"], num["pasid"], r["group"])
                self.child_mark = self.mark()
            elif step == "child-gone":
                ep, pasid, g = self.child
                log = self.log_since(self.child_mark)
                seq = [(e.get("req"), e.get("gran"), e.get("auto_answered")) for e in log
                       if e.get("pasid") == pasid and e.get("req") in
                       ("INVALIDATE", "DETACH_TABLE", "PASID_FREE", "PAGE_RESP")]
                kinds = [s[0] for s in seq]
                ok = ("DETACH_TABLE" in kinds and "PASID_FREE" in kinds and
                      kinds.index("DETACH_TABLE") < kinds.index("PASID_FREE") and
                      ("INVALIDATE", 2, None) in seq and
                      kinds.index("INVALIDATE") < kinds.index("DETACH_TABLE") and
                      pasid not in self.q(cmd="state")["pasids"])
                self.verdict(ok, "exit-order", f"child pasid {pasid}: " + json.dumps(seq))
            elif step == "unbind":
                log = self.log_since(mark)
                seq = [(e["req"], e.get("endpoint")) for e in log
                       if e.get("req") in ("DETACH_TABLE", "PASID_FREE") and e.get("pasid") == num["pasid"]]
                ok = seq == [("DETACH_TABLE", num["ep2"]), ("DETACH_TABLE", num["ep"]),
                             ("PASID_FREE", None)]
                self.verdict(ok, "unbind-order", json.dumps(seq))
            elif step == "stall":
                self.q(cmd="stall", ms=num["ms"], types=[num["type"]])
            elif step == "state":
                st = self.q(cmd="state")
                ok = not st["pasids"] and not st["bindings"]
                self.verdict(ok, "fake-state-clean", f"device holds pasids {st['pasids']}, "
                             f"bindings {st['bindings']}")
            mark = self.mark()
            self.go(reply)
        return 1 if self.failed else 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--socket", required=True)
    s.add_argument("--control", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--endpoints", default="40,41")
    d = sub.add_parser("drive")
    d.add_argument("--control", required=True)
    d.add_argument("--console", required=True)
    d.add_argument("--hostline", required=True)
    d.add_argument("--timeout", type=float, default=240)
    a = p.parse_args()
    if a.mode == "serve":
        with open(a.log, "w") as logf:
            dev = Device([int(x, 0) for x in a.endpoints.split(",")], logf)
            Server(dev, a.socket, a.control).run()
        return 0
    return Driver(a).run()


if __name__ == "__main__":
    sys.exit(main())
