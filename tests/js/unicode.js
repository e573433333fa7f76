// Strings cross the boundary as real UTF-8 both ways (checked by an independent server).
var samples = ["caf\u00e9 na\u00efve \u00c5ngstr\u00f6m", "\u4e2d\u6587 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
               "\ud83d\ude00 \ud83c\udf89 \ud834\udd1e", "nul:\u0000:end", "\u0000", "", "plain ascii",
               "mixed \u00e9\u4e2d\ud83d\ude00\u0000x"];
var i = 0, ok = 0;
var ws = WebsocketClient.connect("%URL%/echo?close_after=" + samples.length);
samples.forEach(function(s) { ws.send(s); });
ws.onmessage(function(conn, msg) {
    var want = samples[i++];
    if (msg === want && msg.length === want.length) ok++;
    else log("mismatch at", i - 1, JSON.stringify(msg), "!=", JSON.stringify(want));
});
ws.onclose(function() { log("unicode round trips:", ok, "of", samples.length, "emoji length", samples[2].length); });
ws.onerror(function(conn, e) { log("error", e); });
