// wss against the test server: trusted through SSL_CERT_FILE (set by the test).
var ws = WebsocketClient.connect("%WSS%/echo?close_after=1");
ws.onopen(function() { log("secure connection is up"); });
ws.onmessage(function(conn, msg) { log("echo:", msg); });
ws.onclose(function(conn, code) { log("closed", code); });
ws.onerror(function(conn, e) { log("error:", e); });
ws.send("over TLS");
