// Every snippet of the WebsocketClient page, in page order, as written except for the URI.
var websocket = WebsocketClient.connect("%WSS%/PBX0/APPS/websocket?close_after=1");
websocket.onopen(function(conn) {
    log("connection is up");
});
websocket.onclose(function(conn) {
    log("connection closed");
});
websocket.onerror(function(conn) {
    log("connection error");
});
websocket.onmessage(function(conn, msg) {
    var obj = JSON.parse(msg);
    if (obj.mt == "SomeMessage") {
        // ...
    }
});
websocket.send(JSON.stringify({ mt: "SomeMessage" }));
websocket.setFlowControl(true);

websocket.onmessage(function(conn, msg) {
    var obj = JSON.parse(msg);
    if (obj.mt == "SomeMessage") {
        // ...
    }
    conn.messageComplete();
});
websocket.setFlowControl(true);

websocket.onmessage(function(conn, msg) {
    var obj = JSON.parse(msg);
    if (obj.mt == "SomeMessage") {
        // ...
    }
    conn.messageComplete();
});
