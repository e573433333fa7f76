// A 1 MiB text message and a 1 MiB binary message, echoed intact.
var text = "";
var chunk = "0123456789abcdef\u00e9";
while (text.length < (1 << 20)) text += chunk;
text = text.substring(0, 1 << 20);
var bytes = new Uint8Array(1 << 20);
for (var i = 0; i < bytes.length; i++) bytes[i] = (i * 7) & 255;
var ws = WebsocketClient.connect("%WS%/echo?close_after=2");
ws.send(text).send(bytes);
ws.onmessage(function(conn, msg) {
    if (typeof msg === "string") {
        log("text", msg.length, msg === text);
    } else {
        var same = msg.length === bytes.length;
        for (var j = 0; same && j < msg.length; j++) same = msg[j] === bytes[j];
        log("binary", msg.length, msg instanceof Uint8Array, same);
    }
});
ws.onclose(function() { log("closed"); });
