/*
 * flow: flow control with deferred completion. The message callback only stores the message;
 * the main loop handles it later and only then calls ws_message_complete(). Checks that no
 * second message arrives before completion and that every message arrives, in order, before
 * the close callback, even though the server closes right after sending.
 *
 *   flow URI COUNT          e.g. flow "ws://127.0.0.1:9000/push?n=1000" 1000
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wsclient.h"

struct session {
    long count;     /* messages expected */
    long received;
    int pending;    /* a message was delivered and is not completed yet */
    int done;
    int failed;
};

static void on_message(ws_conn conn, const uint8_t *data, size_t len, ws_message_kind kind, void *user) {
    struct session *s = user;
    char want[32];
    (void)conn;
    if (s->pending) {
        fprintf(stderr, "message %ld delivered before the previous one was completed\n", s->received);
        s->failed = 1;
    }
    snprintf(want, sizeof want, "msg %ld", s->received);
    if (kind != WS_MESSAGE_KIND_TEXT || len != strlen(want) || memcmp(data, want, len) != 0) {
        fprintf(stderr, "message %ld is \"%.*s\", expected \"%s\"\n", s->received, (int)len, (const char *)data, want);
        s->failed = 1;
    }
    s->received++;
    s->pending = 1; /* completed later, from the main loop */
}

static void on_close(ws_conn conn, uint16_t code, const char *reason, size_t reason_len, void *user) {
    struct session *s = user;
    (void)conn;
    (void)reason_len;
    printf("close %u \"%s\" after %ld messages\n", code, reason, s->received);
    if (s->received != s->count || code != 1000) s->failed = 1;
    s->done = 1;
}

static void on_error(ws_conn conn, ws_status kind, const char *message, void *user) {
    struct session *s = user;
    (void)conn;
    fprintf(stderr, "error (%s): %s\n", ws_status_str(kind), message);
    s->failed = 1;
    s->done = 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s URI COUNT\n", argv[0]);
        return 2;
    }
    struct session s = {atol(argv[2]), 0, 0, 0, 0};
    ws_client *client = ws_client_new();
    ws_conn conn;
    if (!client || ws_connect(client, argv[1], &conn) != WS_STATUS_OK) {
        fprintf(stderr, "connect: %s\n", ws_last_error());
        return 1;
    }
    ws_set_flow_control(conn, true);
    ws_on_message(conn, on_message, &s);
    ws_on_close(conn, on_close, &s);
    ws_on_error(conn, on_error, &s);

    struct pollfd pfd = {.fd = ws_client_fd(client), .events = POLLIN};
    while (!s.done) {
        if (s.pending) {
            /* "Handle" the message outside the callback, then ask for the next one. */
            s.pending = 0;
            if (ws_message_complete(conn) != WS_STATUS_OK) {
                fprintf(stderr, "complete: %s\n", ws_last_error());
                return 1;
            }
        }
        if (poll(&pfd, 1, 10000) <= 0) {
            fprintf(stderr, "no event within 10 s\n");
            s.failed = 1;
            break;
        }
        ws_dispatch(client, NULL, NULL);
    }
    ws_client_free(client);
    printf("%s\n", s.failed ? "FAILED" : "ok");
    return s.failed;
}
