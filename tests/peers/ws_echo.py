#!/usr/bin/env python3
"""A WebSocket echo origin (the `websockets` package).

    ws_echo.py [PORT]

Prints `listening 127.0.0.1:PORT`, then for each connection a JSON line
{"event":"ws-open","path":...,"headers":[[name,value],...]} with what the upgrade request
carried, and {"event":"ws-closed","messages":N} when it ends. Every message is sent back as
it came (text as text, binary as binary).
"""

import asyncio
import json
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    print(
        json.dumps(
            {
                "event": "ws-open",
                "path": ws.request.path,
                "headers": [[k, v] for k, v in ws.request.headers.raw_items()],
            }
        ),
        flush=True,
    )
    count = 0
    try:
        async for message in ws:
            count += 1
            await ws.send(message)
    finally:
        print(json.dumps({"event": "ws-closed", "messages": count}), flush=True)


async def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    async with serve(echo, "127.0.0.1", port, max_size=8 << 20) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening 127.0.0.1:{bound}", flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main())
