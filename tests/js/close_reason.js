// A close reason holding U+0000 (and a character outside the BMP) reaches the server whole and
// comes back whole in onclose: wsjs passes it by length (ws_close_with_reason).
var reason = "a\u0000b \ud83d\ude00";
var ws = WebsocketClient.connect("%WS%/echo");
ws.onopen(function(conn) { conn.close(4001, reason); });
ws.onclose(function(conn, code, got) {
    log("close", code, JSON.stringify(got), got === reason ? "same" : "different", got.length);
});
ws.onerror(function(conn, e) { log("error", e); });
