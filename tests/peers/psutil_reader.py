#!/usr/bin/env python3
"""Reads the host with psutil beside the agent's /godoxy/agent/system_info, for comparison.

    psutil_reader.py AGENT_PORT CERT_DIR

Talks HTTPS to godoxy.agent:AGENT_PORT on 127.0.0.1 with the client certificate from CERT_DIR
(ca.pem, client.pem, client.key) over one keep-alive connection. Prints one JSON object of raw
figures; the Rust test judges them:

- memory, disk_root: the agent's latest sample and psutil's reading right after it;
- network, disk_io: counters only grow, so the agent's sample taken just before psutil's
  reading and the first one taken after it bracket psutil's value exactly
  ("before" <= "psutil" <= "after");
- cpu: psutil.cpu_percent over the same window as CPU_SAMPLES consecutive agent samples (the
  window starts and ends when a new sample is seen, polled every 20 ms), with a busy process
  running so the figure is not just idle noise.
"""

import http.client
import json
import os
import ssl
import subprocess
import sys
import time

import psutil

CPU_SAMPLES = 5
PATH = "/godoxy/agent/system_info"


class Agent:
    def __init__(self, port, cert_dir):
        ctx = ssl.create_default_context(cafile=os.path.join(cert_dir, "ca.pem"))
        ctx.load_cert_chain(os.path.join(cert_dir, "client.pem"), os.path.join(cert_dir, "client.key"))
        ctx.check_hostname = False  # the certificate names godoxy.agent; we dial 127.0.0.1
        self.conn = http.client.HTTPSConnection("127.0.0.1", int(port), context=ctx, timeout=10)

    def latest(self):
        """The latest sample; waits through 204s for the first."""
        deadline = time.monotonic() + 10
        while True:
            self.conn.request("GET", PATH, headers={"Host": "godoxy.agent"})
            resp = self.conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                return json.loads(body)
            if resp.status != 204 or time.monotonic() > deadline:
                raise SystemExit(f"unexpected {resp.status}: {body!r}")
            time.sleep(0.05)

    def next_after(self, sample):
        """The first sample newer than `sample` (polled every 20 ms)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            newer = self.latest()
            if newer != sample:
                return newer
            time.sleep(0.02)
        raise SystemExit("no new sample within 10 s")


def bracket(agent, read):
    """(agent value before, psutil value, agent value after) for a growing counter."""
    before = agent.latest()
    value = read()
    seen = agent.latest()  # taken before or after `value`: the next one is surely after
    after = agent.next_after(seen)
    return before, value, after


def main():
    port, cert_dir = sys.argv[1:3]
    agent = Agent(port, cert_dir)
    out = {}

    sample = agent.latest()
    vm = psutil.virtual_memory()
    root = psutil.disk_usage("/")
    out["memory"] = {"agent": sample["memory"], "psutil": {"total": vm.total, "available": vm.available, "used": vm.total - vm.available}}
    disks = sample.get("disks") or {}
    agent_root = next((d for d in disks.values() if d["path"] == "/"), None)
    out["disk_root"] = {"agent": agent_root, "psutil": {"total": root.total, "used": root.used, "free": root.free, "percent": root.percent}}

    before, net, after = bracket(agent, lambda: psutil.net_io_counters())
    out["network"] = {
        "before": before["network"],
        "psutil": {"bytes_sent": net.bytes_sent, "bytes_recv": net.bytes_recv},
        "after": after["network"],
    }

    before, io, after = bracket(agent, lambda: psutil.disk_io_counters(perdisk=True))
    out["disk_io"] = {
        "before": before.get("disks_io") or {},
        "psutil": {name: {"read_count": c.read_count, "write_count": c.write_count, "read_bytes": c.read_bytes, "write_bytes": c.write_bytes} for name, c in io.items()},
        "after": after.get("disks_io") or {},
    }

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        start = agent.next_after(agent.latest())
        psutil.cpu_percent(None)
        samples = []
        previous = start
        for _ in range(CPU_SAMPLES):
            previous = agent.next_after(previous)
            samples.append(previous["cpu_average"])
        psutil_percent = psutil.cpu_percent(None)
    finally:
        busy.kill()
        busy.wait()
    out["cpu"] = {"agent": samples, "psutil": psutil_percent}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
