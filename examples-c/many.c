/*
 * many: opens COUNT connections at once, waits until all are open, then frees the client with
 * all of them still open. ws_client_free must close them, stop the I/O thread and release
 * everything (the tests run this under valgrind, which reports any leak).
 *
 *   many URI COUNT
 */
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "wsclient.h"

static long opened, failed;

static void on_open(ws_conn conn, void *user) {
    (void)conn, (void)user;
    opened++;
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

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s URI COUNT\n", argv[0]);
        return 2;
    }
    long count = atol(argv[2]);
    ws_client *client = ws_client_new();
    if (!client) return 1;
    for (long i = 0; i < count; i++) {
        ws_conn conn;
        if (ws_connect(client, argv[1], &conn) != WS_STATUS_OK) {
            fprintf(stderr, "connect: %s\n", ws_last_error());
            return 1;
        }
        ws_on_open(conn, on_open, NULL);
        ws_on_error(conn, on_error, NULL);
    }
    struct pollfd pfd = {.fd = ws_client_fd(client), .events = POLLIN};
    while (opened + failed < count) {
        if (poll(&pfd, 1, 30000) <= 0) {
            fprintf(stderr, "no event within 30 s\n");
            return 1;
        }
        ws_dispatch(client, NULL, NULL);
    }
    size_t alive = ws_client_connection_count(client);
    double t0 = now_s();
    ws_status status = ws_client_free(client);
    printf("%ld open, %zu alive at free, freed in %.0f ms: %s\n", opened, alive, (now_s() - t0) * 1e3,
           ws_status_str(status));
    return failed || status != WS_STATUS_OK || alive != (size_t)count;
}
