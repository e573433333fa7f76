/*
 * echo: connect, send text and binary, check the echoes, close, with the host's own poll() loop
 * on the library's file descriptor. Exits 0 when everything came back as sent.
 *
 *   echo URI [CA_PEM]       e.g. echo ws://127.0.0.1:9000/echo
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wsclient.h"

struct session {
    int next;       /* index of the next expected echo */
    int done;       /* final callback seen */
    int failed;
};

static const char *const texts[] = {"hello", "caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80", ""};
static const unsigned char binary[] = {0, 1, 2, 254, 255};
#define TEXTS (int)(sizeof texts / sizeof texts[0])

static void on_open(ws_conn conn, void *user) {
    (void)conn;
    (void)user;
    printf("open\n");
}

static void on_message(ws_conn conn, const uint8_t *data, size_t len, ws_message_kind kind, void *user) {
    struct session *s = user;
    if (s->next < TEXTS) {
        const char *want = texts[s->next];
        if (kind != WS_MESSAGE_KIND_TEXT || len != strlen(want) || memcmp(data, want, len) != 0 || data[len] != 0) {
            fprintf(stderr, "echo %d differs\n", s->next);
            s->failed = 1;
        }
        printf("text echo: \"%s\" (%zu bytes)\n", (const char *)data, len);
    } else {
        if (kind != WS_MESSAGE_KIND_BINARY || len != sizeof binary || memcmp(data, binary, len) != 0) {
            fprintf(stderr, "binary echo differs\n");
            s->failed = 1;
        }
        printf("binary echo: %zu bytes\n", len);
        /* Everything came back: close with our own code and reason. */
        if (ws_close(conn, 4000, "echo done") != WS_STATUS_OK) {
            fprintf(stderr, "close: %s\n", ws_last_error());
            s->failed = 1;
        }
    }
    s->next++;
}

static void on_close(ws_conn conn, uint16_t code, const char *reason, size_t reason_len, void *user) {
    struct session *s = user;
    (void)conn;
    (void)reason_len;
    printf("close %u \"%s\"\n", code, reason);
    if (code != 4000 || s->next != TEXTS + 1) s->failed = 1;
    s->done = 1;
}

static void on_error(ws_conn conn, ws_status kind, const char *message, void *user) {
    struct session *s = user;
    (void)conn;
    fprintf(stderr, "error (%s): %s\n", ws_status_str(kind), message);
    s->failed = 1;
    s->done = 1;
}

static int check(ws_status status, const char *what) {
    if (status != WS_STATUS_OK) {
        fprintf(stderr, "%s: %s: %s\n", what, ws_status_str(status), ws_last_error());
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s URI [CA_PEM]\n", argv[0]);
        return 2;
    }
    /* The library the loader found must be the ABI this program was compiled against: the same
     * major version, and not older than the header (the ABI only grows). */
    uint32_t loaded = ws_version_number();
    if (loaded >> 16 != WSCLIENT_VERSION_NUMBER >> 16 || loaded < WSCLIENT_VERSION_NUMBER) {
        fprintf(stderr, "libwsclient %s does not match wsclient.h %s\n", ws_version(), WSCLIENT_VERSION);
        return 1;
    }
    struct session s = {0, 0, 0};
    ws_client *client = ws_client_new();
    ws_options *options = ws_options_new();
    if (!client || !options) {
        fprintf(stderr, "setup: %s\n", ws_last_error());
        return 1;
    }
    if (argc > 2 && !check(ws_options_add_ca_file(options, argv[2]), "CA file")) return 1;

    ws_conn conn;
    if (!check(ws_connect_with_options(client, argv[1], options, &conn), "connect")) return 1;
    ws_options_free(options);

    /* Registered after connect, before the loop: in force when the connection opens. */
    ws_on_open(conn, on_open, &s);
    ws_on_message(conn, on_message, &s);
    ws_on_close(conn, on_close, &s);
    ws_on_error(conn, on_error, &s);

    /* Sent before the connection is open: queued, sent in order after the handshake. If the
     * connect has already failed, send says WS_STATUS_CLOSING and the error callback follows. */
    for (int i = 0; i < TEXTS; i++) {
        ws_status st = ws_send(conn, texts[i], strlen(texts[i]));
        if (st != WS_STATUS_CLOSING && !check(st, "send")) return 1;
    }
    ws_status st = ws_send_binary(conn, binary, sizeof binary);
    if (st != WS_STATUS_CLOSING && !check(st, "send binary")) return 1;

    /* The host's own event loop: poll the library's fd, dispatch when it is readable. */
    struct pollfd pfd = {.fd = ws_client_fd(client), .events = POLLIN};
    while (!s.done) {
        if (poll(&pfd, 1, 10000) <= 0) {
            fprintf(stderr, "no event within 10 s\n");
            s.failed = 1;
            break;
        }
        if (!check(ws_dispatch(client, NULL, NULL), "dispatch")) return 1;
    }

    /* The connection is gone now: calls with its handle answer WS_STATUS_GONE. */
    if (ws_send(conn, "late", 4) != WS_STATUS_GONE) s.failed = 1;
    if (!check(ws_client_free(client), "free")) return 1;
    printf("%s\n", s.failed ? "FAILED" : "ok");
    return s.failed;
}
