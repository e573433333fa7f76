"""An independent WebSocket peer for the tests: Python's `websockets` (asyncio) on 127.0.0.1.

Prints "port=N" once listening, then one line per close frame it receives ("close CODE REASON"),
and serves until stdin closes. With the argument "deflate" it offers permessage-deflate with
websockets' defaults (windows of 12 bits, memLevel 5); with "deflate-open" with no limits of its
own (it accepts what the client asks for); either way it prints "extensions VALUE" per connection.
Paths:
  /echo?close_after=N     echo text as text and binary as binary; close with 1000 after N messages
  /push?n=N               send "msg 0".."msg N-1", then close with 1000 "done"
  /close?code=C&reason=R  close at once with code C and reason R
  /fragments              send one text message in three fragments, then echo
  /ping                   ping with payload "are you there", send "pong:<payload>" once answered, then echo
"""

import asyncio
import sys
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

MODE = sys.argv[1] if len(sys.argv) > 1 else ""


def report(ws):
    frame = ws.protocol.close_rcvd
    if frame is not None:
        print(f"close {frame.code} {frame.reason}", flush=True)


async def echo(ws, close_after):
    echoed = 0
    async for message in ws:
        await ws.send(message)
        echoed += 1
        if close_after and echoed == close_after:
            await ws.close(1000, "")
            return


async def handler(ws):
    url = urlparse(ws.request.path)
    if MODE:
        print(f"extensions {ws.response.headers.get('Sec-WebSocket-Extensions', '')}", flush=True)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    try:
        if url.path == "/push":
            for i in range(int(query.get("n", "10"))):
                await ws.send(f"msg {i}")
            await ws.close(1000, "done")
        elif url.path == "/close":
            await ws.close(int(query.get("code", "1000")), query.get("reason", ""))
        elif url.path == "/fragments":
            await ws.send(["hel", "lo ", "w\u00f6rld"])
            await echo(ws, None)
        elif url.path == "/ping":
            waiter = await ws.ping(b"are you there")
            await waiter
            await ws.send("pong:are you there")
            await echo(ws, None)
        else:
            await echo(ws, int(query.get("close_after", "0")) or None)
    except ConnectionClosed:
        pass
    finally:
        await ws.wait_closed()
        report(ws)


async def main():
    if MODE == "deflate":
        settings = {"compression": "deflate"}
    elif MODE == "deflate-open":
        settings = {"compression": None, "extensions": [ServerPerMessageDeflateFactory()]}
    else:
        settings = {"compression": None}
    async with serve(handler, "127.0.0.1", 0, max_size=None, **settings) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"port={port}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


asyncio.run(main())
