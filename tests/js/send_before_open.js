// Calls made right after connect are handled before the connection is established: the sends
// are queued and go out, in order, after the handshake.
var received = [];
var ws = WebsocketClient.connect("%WS%/echo?close_after=5");
for (var i = 0; i < 5; i++) ws.send("m" + i);
ws.onopen(function(conn) { log("open, sent before it:", received.length === 0); });
ws.onmessage(function(conn, msg) { received.push(msg); });
ws.onclose(function(conn) { log("echoes:", received.join(",")); });
