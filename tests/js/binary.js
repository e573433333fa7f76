// Binary: a Uint8Array (or ArrayBuffer) is sent as binary and arrives as a Uint8Array.
var ws = WebsocketClient.connect("%URL%/echo?close_after=2");
ws.send(new Uint8Array([0, 1, 2, 253, 254, 255]));
ws.send(new Uint8Array([9, 8, 7]).buffer);
ws.onmessage(function(conn, msg) {
    log(msg instanceof Uint8Array, msg.length, Array.prototype.join.call(msg, ","));
});
ws.onclose(function() { log("closed"); });
