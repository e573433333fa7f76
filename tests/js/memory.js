// 10,000 connections one after another; memory must not grow with them.
var TOTAL = 10000, done = 0, rssAfterWarmup = 0;
function next() {
    var ws = WebsocketClient.connect("%WS%/echo?close_after=1");
    ws.send("x");
    ws.onclose(function() {
        done++;
        if (done === 1000) { Duktape.gc(); rssAfterWarmup = memoryUsage(); }
        if (done < TOTAL) next();
        else {
            Duktape.gc();
            var growth = memoryUsage() - rssAfterWarmup;
            log("connections:", done, "rss after 1000:", rssAfterWarmup, "growth over the next 9000:", growth);
        }
    });
    ws.onerror(function(conn, e) { log("error", e); });
}
next();
