// Flow control with messageComplete deferred through setTimeout: never a second onmessage
// before messageComplete; all messages, in order, even though the server closes right after
// sending the last one.
var expected = 0, pending = false, violations = 0;
var ws = WebsocketClient.connect("%URL%/push?n=200");
ws.setFlowControl(true);
ws.onmessage(function(conn, msg) {
    if (pending) violations++;
    if (msg !== "msg " + expected) log("out of order:", msg, "expected msg " + expected);
    expected++;
    pending = true;
    setTimeout(function() { pending = false; conn.messageComplete(); }, expected % 10 === 0 ? 2 : 0);
});
ws.onclose(function(conn, code, reason) {
    log("closed", code, reason, "after", expected, "messages,", violations, "violations");
});
ws.onerror(function(conn, e) { log("error", e); });
