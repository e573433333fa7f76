// Server close -> onclose; TCP drop -> onerror; HTTP 403 -> onerror. One final callback each.
function watch(name, uri) {
    var ws = WebsocketClient.connect(uri);
    ws.onmessage(function(conn, msg) { log(name, "message", msg); });
    ws.onclose(function(conn, code, reason) { log(name, "onclose", code, reason); });
    ws.onerror(function(conn, e) { log(name, "onerror", e); });
}
watch("close", "%WS%/close?code=4000&reason=server%20done");
setTimeout(function() { watch("drop", "%WS%/drop"); }, 0);
setTimeout(function() { watch("reject", "%WS%/reject"); }, 0);
