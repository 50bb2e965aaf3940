#!/usr/bin/env python3
"""A WebSocket client of /godoxy/agent/system_info (the `websockets` package), as GoDoxy's
dashboard uses it.

    metrics_ws.py AGENT_PORT CERT_DIR MODE QUERY SECONDS

Connects to wss://godoxy.agent:AGENT_PORT/godoxy/agent/system_info?QUERY on 127.0.0.1 with the
client certificate from CERT_DIR, an unrelated Origin and the WebUI's CSRF subprotocol, then:

- MODE `ping`: sends the text `ping` every second for SECONDS, collecting every frame;
- MODE `silent`: sends nothing and waits up to SECONDS for the agent to close.

Prints one JSON line: the handshake status, the subprotocol echoed, the frames (arrival time
in seconds since the handshake, and text), and how and when the socket was closed. A refused
handshake prints its status and body.
"""

import asyncio
import json
import os
import ssl
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


async def main():
    port, cert_dir, mode, query, seconds = sys.argv[1:6]
    seconds = float(seconds)
    ctx = ssl.create_default_context(cafile=os.path.join(cert_dir, "ca.pem"))
    ctx.load_cert_chain(os.path.join(cert_dir, "client.pem"), os.path.join(cert_dir, "client.key"))
    uri = f"wss://godoxy.agent:{port}/godoxy/agent/system_info?{query}"
    try:
        ws = await connect(
            uri,
            ssl=ctx,
            host="127.0.0.1",
            port=int(port),
            server_hostname="godoxy.agent",
            origin="https://dashboard.example.net",
            subprotocols=["csrf.t0ken"],
            ping_interval=None,  # only the application's `ping` keeps the socket open
            open_timeout=10,
            compression=None,
        )
    except InvalidStatus as err:
        resp = err.response
        print(json.dumps({"status": resp.status_code, "body": resp.body.decode(errors="replace")}))
        return
    start = time.monotonic()
    out = {"status": ws.response.status_code, "subprotocol": ws.subprotocol, "frames": [], "pongs": 0}

    async def pinger():
        while True:
            await ws.send("ping")
            await asyncio.sleep(1)

    task = asyncio.create_task(pinger()) if mode == "ping" else None
    try:
        async with asyncio.timeout(seconds):
            async for message in ws:
                now = round(time.monotonic() - start, 3)
                if message == "pong":
                    out["pongs"] += 1
                else:
                    out["frames"].append({"at": now, "text": message})
    except TimeoutError:
        out["closed"] = None
    except ConnectionClosed:
        pass
    if "closed" not in out:
        out["closed"] = {
            "at": round(time.monotonic() - start, 3),
            "code": ws.close_code,
            "reason": ws.close_reason,
        }
    if task:
        task.cancel()
    await ws.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
