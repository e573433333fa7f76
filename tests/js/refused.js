// Connection refused: one onerror, no onclose; afterwards the object is gone.
var ws = WebsocketClient.connect("%CLOSED%/");
ws.onopen(function() { log("onopen"); });
ws.onclose(function() { log("onclose"); });
ws.onerror(function(conn, e) {
    log("onerror:", e);
    setTimeout(function() {
        try { conn.send("late"); log("send worked"); } catch (err) { log("send threw:", err.message); }
        try { conn.onopen(function() {}); } catch (err) { log("onopen threw:", err.message); }
    }, 0);
});
