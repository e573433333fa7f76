var ws = WebsocketClient.connect("%WS%/echo");
ws.onopen(function(conn) { log("open"); conn.close(4001, "closing in onopen"); conn.close(); });
ws.onclose(function(conn, code, reason) { log("closed", code, reason); });
