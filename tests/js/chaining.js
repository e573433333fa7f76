var ws = WebsocketClient.connect("%WS%/echo?close_after=1");
var same = ws.onopen(function() {}) === ws
    && ws.onclose(function() { log("closed"); }) === ws
    && ws.onerror(function() {}) === ws
    && ws.onmessage(function(conn, msg) { log("echo", msg, conn === ws); }) === ws
    && ws.setFlowControl(false) === ws
    && ws.messageComplete() === ws
    && ws.send("chained") === ws;
log("every method returns the object:", same);
// Registering again replaces the earlier callback.
ws.onopen(function() { log("second onopen"); });
