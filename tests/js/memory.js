// 10,000 connections one after another; memory must not grow with them. heapUsed counts the
// bytes malloc has handed out (exact); rss is shown for information (it moves with malloc's
// caches and arenas).
var TOTAL = 10000, done = 0, warm = null;
function next() {
    var ws = WebsocketClient.connect("%WS%/echo?close_after=1");
    ws.send("x");
    ws.onclose(function() {
        done++;
        if (done === 1000) { Duktape.gc(); warm = memoryUsage(); }
        if (done < TOTAL) { next(); return; }
        Duktape.gc();
        var end = memoryUsage();
        log("connections:", done, "rss after 1000:", warm.rss, "rss after 10000:", end.rss,
            "heapUsed after 1000:", warm.heapUsed, "heap growth over the next 9000:", end.heapUsed - warm.heapUsed);
    });
    ws.onerror(function(conn, e) { log("error", e); });
}
next();
