// make demo: a small JSON conversation with an app service over wss, in the style of the
// WebsocketClient page. %SERVER% is filled in by examples-c/demo.sh.
var pbx = WebsocketClient.connect("%SERVER%/PBX0/APPS/demo");
var presence = {};

function request(obj) {
    log("->", JSON.stringify(obj));
    pbx.send(JSON.stringify(obj));
}

// Calls made right after connect are handled before the connection is established.
request({ mt: "Login", user: "alice" });

pbx.setFlowControl(true)
   .onopen(function(conn) {
       log("connection is up");
   })
   .onmessage(function(conn, msg) {
       var obj = JSON.parse(msg);
       log("<-", msg);
       if (obj.mt == "LoginResult" && obj.ok) {
           request({ mt: "SubscribePresence" });
       } else if (obj.mt == "PresenceChanged") {
           presence[obj.user] = obj.status;
       } else if (obj.mt == "SubscribePresenceResult") {
           var names = Object.keys(presence).sort();
           log("presence of " + obj.count + " users:", names.map(function(n) { return n + "=" + presence[n]; }).join(", "));
           request({ mt: "Logout" });
       }
       // Flow control: take the next message only when this one is handled, a moment later.
       setTimeout(function() { conn.messageComplete(); }, 5);
   })
   .onclose(function(conn, code, reason) {
       log("connection closed:", code, reason);
   })
   .onerror(function(conn, error) {
       log("connection error:", error);
   });
