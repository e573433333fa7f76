// The seed's use case under load: flow control on, and each message completed later, from a
// timer, by a closure that sees the message (as after an async job). %URL% pushes the messages
// (text and binary alternately). Prints the RSS when the connection opened and, at the end, the
// process's peak RSS (the kernel's high-water mark), for the test to compare; throws once the
// RSS has grown by 64 MiB (the test's bound is 32 MiB), so that a regression fails fast (wsjs
// exits 1) instead of filling the machine.
var opened = null, count = 0, wrong = 0;
var ws = WebsocketClient.connect("%URL%");
ws.setFlowControl(true);
ws.onopen(function() { opened = memoryUsage().rss; log("RSS at open", opened); });
ws.onmessage(function(conn, msg) {
    var n = count++;
    setTimeout(function() {
        var first = typeof msg === "string" ? msg.substring(0, 16) : msg[0] + 256 * msg[1];
        if (typeof msg === "string" ? first.indexOf("msg " + n + " ") !== 0 : first !== (n & 0xffff)) wrong++;
        if (memoryUsage().rss - opened > (64 << 20))
            throw new Error("gave up: the RSS grew by 64 MiB within " + (n + 1) + " messages");
        conn.messageComplete();
    }, 0);
});
ws.onclose(function(conn, code, reason) {
    log("closed", code, reason, "after", count, "messages,", wrong, "wrong");
    log("peak RSS", memoryUsage().peakRss);
});
ws.onerror(function(conn, e) { log("error", e); });
