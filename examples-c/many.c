/*
 * many: opens COUNT connections at once, waits until all are open, then frees the client with
 * all of them still open. ws_client_free must close them, stop the I/O thread and release
 * everything (the tests run this under valgrind, which reports any leak).
 *
 *   many URI COUNT [BYTES deflate|plain]
 *
 * With BYTES, each connection also sends one JSON-like text message of BYTES bytes once open and
 * waits for its echo before the client is freed, with permessage-deflate offered (deflate) or
 * not (plain); the peak RSS of the process is printed then: the memory benchmark of permessage-
 * deflate (`make bench-memory` runs it against a compressing echo server).
 */
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "wsclient.h"

static long opened, failed, echoed;
static char *message;
static size_t message_len;

static void on_open(ws_conn conn, void *user) {
    (void)user;
    opened++;
    if (message && ws_send(conn, message, message_len) != WS_STATUS_OK) {
        fprintf(stderr, "send: %s\n", ws_last_error());
        failed++;
    }
}

static void on_message(ws_conn conn, const uint8_t *data, size_t len, ws_message_kind kind, void *user) {
    (void)conn, (void)kind, (void)user;
    if (len != message_len || memcmp(data, message, len) != 0) {
        fprintf(stderr, "the echo differs\n");
        failed++;
    }
    echoed++;
}

static void on_error(ws_conn conn, ws_status kind, const char *message, void *user) {
    (void)conn, (void)kind, (void)user;
    fprintf(stderr, "error: %s\n", message);
    failed++;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long peak_rss_kib(void) {
    char line[256];
    long kib = 0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kib = atol(line + 6);
    fclose(f);
    return kib;
}

/* A JSON-like text of `len` bytes, different for every run of fields, as app messages are. */
static char *json_like(size_t len) {
    char *out = malloc(len + 64);
    if (!out) return NULL;
    size_t at = 0;
    for (unsigned i = 0; at < len; i++)
        at += (size_t)sprintf(out + at, "{\"type\":\"presence\",\"seq\":%u,\"user\":\"u_%08x\",\"online\":%s}", i,
                              i * 2654435761u, i % 3 ? "true" : "false");
    out[len] = 0;
    return out;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 5) {
        fprintf(stderr, "usage: %s URI COUNT [BYTES deflate|plain]\n", argv[0]);
        return 2;
    }
    long count = atol(argv[2]);
    int deflate = 1;
    if (argc == 5) {
        message_len = (size_t)atol(argv[3]);
        message = json_like(message_len);
        deflate = !strcmp(argv[4], "deflate");
        if (!message || (!deflate && strcmp(argv[4], "plain"))) return 2;
    }
    ws_client *client = ws_client_new();
    ws_options *options = ws_options_new();
    if (!client || !options || ws_options_set_deflate(options, deflate) != WS_STATUS_OK) return 1;
    for (long i = 0; i < count; i++) {
        ws_conn conn;
        if (ws_connect_with_options(client, argv[1], options, &conn) != WS_STATUS_OK) {
            fprintf(stderr, "connect: %s\n", ws_last_error());
            return 1;
        }
        ws_on_open(conn, on_open, NULL);
        ws_on_message(conn, on_message, NULL);
        ws_on_error(conn, on_error, NULL);
    }
    ws_options_free(options);
    struct pollfd pfd = {.fd = ws_client_fd(client), .events = POLLIN};
    while (opened + failed < count || (message && echoed + failed < count)) {
        if (poll(&pfd, 1, 30000) <= 0) {
            fprintf(stderr, "no event within 30 s\n");
            return 1;
        }
        ws_dispatch(client, NULL, NULL);
    }
    size_t alive = ws_client_connection_count(client);
    long peak = peak_rss_kib();
    double t0 = now_s();
    ws_status status = ws_client_free(client);
    printf("%ld open, %zu alive at free, freed in %.0f ms: %s\n", opened, alive, (now_s() - t0) * 1e3,
           ws_status_str(status));
    if (message)
        printf("%s: %ld connections, one %zu-byte message echoed on each: peak RSS %ld KiB\n",
               deflate ? "deflate" : "plain", count, message_len, peak);
    free(message);
    return failed || status != WS_STATUS_OK || alive != (size_t)count;
}
