// Run with WSJS_HEAP_LIMIT below the size of the message %URL% pushes: wsjs runs out of memory
// while it pushes the message for onmessage, which must never run.
var ws = WebsocketClient.connect("%URL%");
ws.onopen(function() { log("open"); });
ws.onmessage(function(conn, msg) { log("onmessage must not run, got", msg.length); });
ws.onclose(function(conn, code) { log("onclose must not run", code); });
ws.onerror(function(conn, e) { log("onerror must not run", e); });
