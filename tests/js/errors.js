// Invalid URIs throw an Error carrying the reason.
["http://example.com/", "relative/path", "", "ws://host:99999/"].forEach(function(u) {
    try { WebsocketClient.connect(u); log("no throw for", u); } catch (e) { log(e instanceof Error, e.message); }
});
