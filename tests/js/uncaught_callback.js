var ws = WebsocketClient.connect("%WS%/echo");
ws.onopen(function() { log("open"); undefinedFunction(); });
ws.onclose(function() { log("onclose must not run after the exception"); });
