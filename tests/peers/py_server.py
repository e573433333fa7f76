"""An independent WebSocket peer for the tests: Python's `websockets` (asyncio) on 127.0.0.1.

Prints "port=N" once listening, then serves until stdin closes. Paths:
  /echo?close_after=N   echo text as text and binary as binary; close with 1000 after N messages
  /push?n=N             send "msg 0".."msg N-1", then close with 1000 "done"
"""

import asyncio
import sys
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import serve


async def handler(ws):
    url = urlparse(ws.request.path)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    if url.path == "/push":
        for i in range(int(query.get("n", "10"))):
            await ws.send(f"msg {i}")
        await ws.close(1000, "done")
        return
    close_after = int(query.get("close_after", "0")) or None
    echoed = 0
    async for message in ws:
        await ws.send(message)
        echoed += 1
        if close_after and echoed == close_after:
            await ws.close(1000, "")
            return


async def main():
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"port={port}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


asyncio.run(main())
