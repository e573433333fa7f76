// An independent WebSocket peer for the tests: Node's `ws` on 127.0.0.1, with the same paths and
// output as py_server.py: prints "port=N", then "close CODE REASON" per close frame received
// (and "ping" per ping, which Python's asyncio API does not expose);
// serves until stdin closes. With the argument "deflate" it offers permessage-deflate (ws's
// defaults, every message compressed: threshold 0) and prints "extensions VALUE" per connection
// and "bytes_read N" (socket bytes after the upgrade's) when it closes. Also the path
// /fragments_ping: one text message in three fragments with pings between them, then echo.
"use strict";
const { WebSocketServer } = require("ws");

const deflate = process.argv[2] === "deflate";
const server = new WebSocketServer({
  host: "127.0.0.1",
  port: 0,
  perMessageDeflate: deflate ? { threshold: 0 } : false,
  maxPayload: 0,
});

function echo(ws, closeAfter) {
  let echoed = 0;
  ws.on("message", (data, isBinary) => {
    ws.send(data, { binary: isBinary });
    echoed++;
    if (closeAfter && echoed === closeAfter) ws.close(1000, "");
  });
}

server.on("connection", (ws, request) => {
  const url = new URL(request.url, "ws://localhost");
  const q = url.searchParams;
  ws.on("ping", () => console.log("ping"));
  const socket = request.socket;
  const readAtOpen = socket.bytesRead;
  ws.on("close", (code, reason) => {
    if (code !== 1005 && code !== 1006) console.log(`close ${code} ${reason.toString()}`);
    if (deflate) console.log(`bytes_read ${socket.bytesRead - readAtOpen}`);
  });
  switch (url.pathname) {
    case "/push":
      for (let i = 0; i < Number(q.get("n") || 10); i++) ws.send(`msg ${i}`);
      ws.close(1000, "done");
      break;
    case "/close":
      ws.close(Number(q.get("code") || 1000), q.get("reason") || "");
      break;
    case "/fragments":
      ws.send("hel", { fin: false });
      ws.send("lo ", { fin: false });
      ws.send("w\u00f6rld", { fin: true });
      echo(ws, 0);
      break;
    case "/fragments_ping":
      ws.send("hel", { fin: false });
      ws.ping("between");
      ws.send("lo ", { fin: false });
      ws.ping("");
      ws.send("w\u00f6rld", { fin: true });
      echo(ws, 0);
      break;
    case "/ping":
      ws.once("pong", (payload) => {
        ws.send(`pong:${payload.toString()}`);
        echo(ws, 0);
      });
      ws.ping("are you there");
      break;
    default:
      echo(ws, Number(q.get("close_after") || 0));
  }
});

// The response's extension header, as sent (ws.extensions would name the extension alone).
server.on("headers", (headers) => {
  if (!deflate) return;
  const line = headers.find((h) => h.toLowerCase().startsWith("sec-websocket-extensions:"));
  console.log(`extensions ${line ? line.slice(line.indexOf(":") + 1).trim() : ""}`);
});

server.on("listening", () => console.log(`port=${server.address().port}`));
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
