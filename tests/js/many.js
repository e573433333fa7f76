// 200 connections from one script, all at once.
var N = 200, echoed = 0, closed = 0;
for (var i = 0; i < N; i++) {
    (function(n) {
        var ws = WebsocketClient.connect("%WS%/echo?close_after=1&n=" + n);
        ws.send("hello " + n);
        ws.onmessage(function(conn, msg) { if (msg === "hello " + n) echoed++; });
        ws.onclose(function() { if (++closed === N) log("all closed:", closed, "echoed:", echoed); });
        ws.onerror(function(conn, e) { log("error", n, e); });
    })(i);
}
