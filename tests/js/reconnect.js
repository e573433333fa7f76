// Reconnect from inside onclose, three times.
var rounds = 0;
function start() {
    var ws = WebsocketClient.connect("%WS%/echo?close_after=1");
    ws.send("round " + rounds);
    ws.onmessage(function(conn, msg) { log("echo", msg); });
    ws.onclose(function() {
        if (++rounds < 3) start();
        else log("done after", rounds, "connections");
    });
}
start();
