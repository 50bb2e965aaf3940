#!/usr/bin/env python3
"""A WebSocket client through the agent's HTTP proxy (the `websockets` package).

    ws_client.py AGENT_PORT CERT_DIR TARGET PATH COUNT

Connects to wss://godoxy.agent:AGENT_PORT/godoxy/agent/proxy/http/PATH on 127.0.0.1 with the
client certificate from CERT_DIR (ca.pem, client.pem, client.key) and X-Proxy-Host TARGET,
sends COUNT numbered text messages and one 1 MiB binary one while reading the echoes, and
checks that every echo came back in order. Prints one JSON line: the handshake's status and
the count echoed; exits 1 on any mismatch.
"""

import asyncio
import json
import os
import ssl
import sys

from websockets.asyncio.client import connect


async def main():
    port, cert_dir, target, path, count = sys.argv[1:6]
    count = int(count)
    ctx = ssl.create_default_context(cafile=os.path.join(cert_dir, "ca.pem"))
    ctx.load_cert_chain(os.path.join(cert_dir, "client.pem"), os.path.join(cert_dir, "client.key"))
    uri = f"wss://godoxy.agent:{port}/godoxy/agent/proxy/http{path}"
    headers = {"X-Proxy-Host": target, "X-Proxy-Scheme": "http", "X-Proxy-Config": "e30="}
    big = os.urandom(1 << 20)
    async with connect(
        uri,
        ssl=ctx,
        host="127.0.0.1",
        port=int(port),
        server_hostname="godoxy.agent",
        additional_headers=headers,
        max_size=8 << 20,
        open_timeout=10,
    ) as ws:
        status = ws.response.status_code

        async def send_all():
            for i in range(count):
                await ws.send(f"message {i}")
            await ws.send(big)

        sender = asyncio.create_task(send_all())
        for i in range(count):
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != f"message {i}":
                print(json.dumps({"status": status, "error": f"echo {i}: {got!r}"}))
                sys.exit(1)
        got = await asyncio.wait_for(ws.recv(), 10)
        if got != big:
            print(json.dumps({"status": status, "error": "1 MiB binary echo differs"}))
            sys.exit(1)
        await sender
    print(json.dumps({"status": status, "echoed": count + 1}))


if __name__ == "__main__":
    asyncio.run(main())
