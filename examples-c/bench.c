/*
 * bench: the wsclient client for the shared benchmark harness (../shared/bench), used the way a
 * host uses the library: its own event loop on the library's fd, ws_dispatch(), callbacks on
 * this thread, the next message sent from inside the callback. The loop waits with epoll on Linux
 * (the descriptor registered once, edge-triggered; WSB_LEVEL_TRIGGERED=1 registers it
 * level-triggered instead, as libuv does) and with poll() elsewhere. WSB_NO_READ_ON_DISPATCH=1
 * turns ws_options_set_read_on_dispatch off (the I/O thread then reads everything), to measure
 * what reading on the dispatching thread saves.
 *
 *   bench --url ws://127.0.0.1:18701 --mode pingpong|pipeline|flood|conns|reconnect --size S --count N
 *         [--window W] [--conns C] [--ca CA.pem] [--payload FILE] [--deflate]
 *
 * --payload FILE (pipeline): message k is line k mod L of FILE, sent as text (--size is ignored).
 * --deflate: offer permessage-deflate and fail unless the server accepts it; without it
 * compression is turned off (the library offers it by default), as the other clients do.
 *
 * Prints one JSON line {"client","mode","size","count","wall_s","msgs_per_s","mb_per_s",
 * "peak_rss_kib","host_thread_cpu_s"}; exit 2 for an unsupported mode, 1 on failure.
 * host_thread_cpu_s is the CPU time of this thread (the host's: callbacks, and the sends it
 * writes itself) from the connect to the end, the cost a JS engine's thread would pay. WSB_READ_BUFFER=BYTES sets the
 * read buffer option (default: the library's default), for trade-off measurements.
 *
 * --mode reconnect (not a harness mode): N connections one after the other, each closed as soon as
 * it opens, the next started from the previous one's close callback, all with the same options
 * (with --ca, an extra CA: over wss the case whose TLS configuration was once rebuilt per
 * connection). It also prints "process_cpu_us_per_connect": user+sys CPU of the whole process (the
 * library's I/O thread included) per connection.
 */
#define _POSIX_C_SOURCE 200809L
#ifdef __linux__
#include <sys/epoll.h>
#else
#include <poll.h>
#endif
#include <stdio.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "wsclient.h"

enum mode { PINGPONG, PIPELINE, FLOOD, CONNS, RECONNECT };

static struct {
    const char *url, *ca, *payload_file;
    int deflate;
    enum mode mode;
    const char *mode_name;
    long size, count, window, conns;
} args = {"ws://127.0.0.1:18701", NULL, NULL, 0, PINGPONG, "pingpong", 64, 1000, 1, 1};

static struct {
    char *payload;
    /* --payload: the lines of the file (each NUL-terminated in place) and their lengths. */
    char **lines;
    size_t *line_lens;
    long nlines;
    ws_conn *conns;
    long sent, received, echoed, closed, failed;
    double rx_bytes;
    /* reconnect mode: what the next connection is started with. */
    ws_client *client;
    ws_options *options;
    const char *url;
} run;

static void on_open(ws_conn conn, void *user);
static void on_message(ws_conn conn, const uint8_t *data, size_t len, ws_message_kind kind, void *user);
static void on_close(ws_conn conn, uint16_t code, const char *reason, size_t len, void *user);
static void on_error(ws_conn conn, ws_status kind, const char *message, void *user);

static int start(ws_conn *conn) {
    if (ws_connect_with_options(run.client, run.url, run.options, conn) != WS_STATUS_OK) {
        fprintf(stderr, "connect: %s\n", ws_last_error());
        return 0;
    }
    ws_on_open(*conn, on_open, NULL);
    ws_on_message(*conn, on_message, NULL);
    ws_on_close(*conn, on_close, NULL);
    ws_on_error(*conn, on_error, NULL);
    return 1;
}

/* reconnect mode: the next connection, once the previous one has ended. */
static void next_connection(void) {
    ws_conn conn;
    if (args.mode == RECONNECT && run.closed < args.count && !start(&conn)) run.closed = args.count, run.failed++;
}

static void parse(int argc, char **argv) {
    for (int i = 1; i < argc; i += 2) {
        const char *k = argv[i];
        if (!strcmp(k, "--deflate")) {
            args.deflate = 1;
            i--;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s needs a value\n", k);
            exit(2);
        }
        const char *v = argv[i + 1];
        if (!strcmp(k, "--url")) args.url = v;
        else if (!strcmp(k, "--payload")) args.payload_file = v;
        else if (!strcmp(k, "--mode")) args.mode_name = v;
        else if (!strcmp(k, "--size")) args.size = atol(v);
        else if (!strcmp(k, "--count")) args.count = atol(v);
        else if (!strcmp(k, "--window")) args.window = atol(v);
        else if (!strcmp(k, "--conns")) args.conns = atol(v);
        else if (!strcmp(k, "--ca")) args.ca = v;
        else {
            fprintf(stderr, "unknown argument %s\n", k);
            exit(2);
        }
    }
    static const char *const names[] = {"pingpong", "pipeline", "flood", "conns", "reconnect"};
    int found = 0;
    for (int m = 0; m < 5; m++)
        if (!strcmp(args.mode_name, names[m])) args.mode = (enum mode)m, found = 1;
    if (!found) {
        fprintf(stderr, "unsupported mode %s\n", args.mode_name);
        exit(2);
    }
    if (args.window < 1) args.window = 1;
    if (args.conns < 1) args.conns = 1;
}

/* Seconds on `clock`: CLOCK_MONOTONIC for wall time, CLOCK_THREAD_CPUTIME_ID for this thread's CPU. */
static double clock_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* User+sys CPU seconds of the whole process. */
static double process_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
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

/* Reads FILE's non-empty lines (before the clock starts). */
static int load_payload(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)size + 1);
    if (!text || fread(text, 1, (size_t)size, f) != (size_t)size) return -1;
    fclose(f);
    text[size] = 0;
    run.lines = calloc((size_t)size + 1, sizeof *run.lines);
    run.line_lens = calloc((size_t)size + 1, sizeof *run.line_lens);
    if (!run.lines || !run.line_lens) return -1;
    for (char *line = text, *end; line < text + size; line = end + 1) {
        end = strchr(line, '\n');
        if (!end) end = text + size;
        *end = 0;
        if (end > line) {
            run.lines[run.nlines] = line;
            run.line_lens[run.nlines++] = (size_t)(end - line);
        }
    }
    return run.nlines > 0 ? 0 : -1;
}

static void send_one(ws_conn conn) {
    ws_status s;
    if (run.nlines) {
        long k = run.sent % run.nlines;
        s = ws_send(conn, run.lines[k], run.line_lens[k]);
    } else {
        s = args.mode == PIPELINE ? ws_send_binary(conn, run.payload, (size_t)args.size)
                                  : ws_send(conn, run.payload, (size_t)args.size);
    }
    if (s != WS_STATUS_OK) {
        fprintf(stderr, "send: %s\n", ws_last_error());
        run.failed++;
    }
    run.sent++;
}

static void on_open(ws_conn conn, void *user) {
    (void)user;
    if (args.deflate) {
        char extensions[256];
        if (ws_extensions(conn, extensions, sizeof extensions, NULL) != WS_STATUS_OK
            || strncmp(extensions, "permessage-deflate", 18) != 0) {
            fprintf(stderr, "the server did not accept permessage-deflate\n");
            run.failed++;
            ws_close(conn, 1000, NULL);
            return;
        }
    }
    if (args.mode == RECONNECT) ws_close(conn, 1000, NULL);
    if (args.mode == PINGPONG || args.mode == CONNS) send_one(conn);
    if (args.mode == PIPELINE)
        while (run.sent < args.count && run.sent < args.window) send_one(conn);
}

static void on_message(ws_conn conn, const uint8_t *data, size_t len, ws_message_kind kind, void *user) {
    (void)data, (void)kind, (void)user;
    run.rx_bytes += (double)len;
    run.received++;
    switch (args.mode) {
    case PINGPONG:
        if (run.received < args.count) send_one(conn);
        else ws_close(conn, 1000, NULL);
        break;
    case PIPELINE:
        if (run.sent < args.count) send_one(conn);
        if (run.received == args.count) ws_close(conn, 1000, NULL);
        break;
    case CONNS:
        if (++run.echoed == args.conns)
            for (long i = 0; i < args.conns; i++) ws_close(run.conns[i], 1000, NULL);
        break;
    case FLOOD:
    case RECONNECT:
        break;
    }
}

static void on_close(ws_conn conn, uint16_t code, const char *reason, size_t len, void *user) {
    (void)conn, (void)code, (void)reason, (void)len, (void)user;
    run.closed++;
    next_connection();
}

static void on_error(ws_conn conn, ws_status kind, const char *message, void *user) {
    (void)conn, (void)kind, (void)user;
    fprintf(stderr, "error: %s\n", message);
    run.failed++;
    run.closed++;
    next_connection();
}

#ifdef __linux__
/* Whether the loop waits level-triggered (WSB_LEVEL_TRIGGERED=1) rather than edge-triggered. */
static bool level_triggered(void) {
    const char *level = getenv("WSB_LEVEL_TRIGGERED");
    return level && !strcmp(level, "1");
}
#endif

/* Waits until fd is readable (edge-triggered on Linux unless level_triggered()): true, or false
 * after timeout_ms or on an error. */
static bool wait_readable(int fd, int timeout_ms) {
#ifdef __linux__
    static int epoll_fd = -1;
    if (epoll_fd < 0) {
        struct epoll_event event = {.events = level_triggered() ? EPOLLIN : EPOLLIN | EPOLLET};
        epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) return false;
    }
    struct epoll_event event;
    return epoll_wait(epoll_fd, &event, 1, timeout_ms) > 0;
#else
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, timeout_ms) > 0;
#endif
}

int main(int argc, char **argv) {
    parse(argc, argv);
    char url[512];
    if (args.mode == FLOOD) snprintf(url, sizeof url, "%s/flood?size=%ld&count=%ld", args.url, args.size, args.count);
    else snprintf(url, sizeof url, "%s/echo", args.url);
    long nconns = args.mode == CONNS ? args.conns : 1;
    /* Connections to wait for: reconnect mode starts one and each close starts the next. */
    long ends = args.mode == RECONNECT ? args.count : nconns;
    run.payload = malloc((size_t)args.size + 1);
    run.conns = calloc((size_t)nconns, sizeof *run.conns);
    if (!run.payload || !run.conns) return 1;
    memset(run.payload, 'x', (size_t)args.size);
    if (args.payload_file && load_payload(args.payload_file) != 0) {
        fprintf(stderr, "cannot read payload lines from %s\n", args.payload_file);
        return 1;
    }

    ws_client *client = run.client = ws_client_new();
    ws_options *options = run.options = ws_options_new();
    run.url = url;
    if (!client || !options) return 1;
    const char *no_read_on_dispatch = getenv("WSB_NO_READ_ON_DISPATCH");
    if (no_read_on_dispatch && !strcmp(no_read_on_dispatch, "1") &&
        ws_options_set_read_on_dispatch(options, false) != WS_STATUS_OK)
        return 1;
    const char *read_buffer = getenv("WSB_READ_BUFFER");
    if (read_buffer && ws_options_set_read_buffer_size(options, (size_t)atol(read_buffer)) != WS_STATUS_OK) {
        fprintf(stderr, "WSB_READ_BUFFER: %s\n", ws_last_error());
        return 1;
    }
    if (ws_options_set_deflate(options, args.deflate) != WS_STATUS_OK) return 1;
    if (args.deflate && getenv("WSB_DEFLATE_LEVEL")
        && ws_options_set_deflate_level(options, (uint32_t)atol(getenv("WSB_DEFLATE_LEVEL"))) != WS_STATUS_OK) {
        fprintf(stderr, "WSB_DEFLATE_LEVEL: %s\n", ws_last_error());
        return 1;
    }
    if (args.ca && ws_options_add_ca_file(options, args.ca) != WS_STATUS_OK) {
        fprintf(stderr, "CA: %s\n", ws_last_error());
        return 1;
    }
    double t0 = clock_s(CLOCK_MONOTONIC), cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID), process0 = process_cpu_s();
    for (long i = 0; i < nconns; i++)
        if (!start(&run.conns[i])) return 1;

    while (run.closed < ends) {
        if (!wait_readable(ws_client_fd(client), 60000)) {
            fprintf(stderr, "no event within 60 s\n");
            return 1;
        }
        ws_dispatch(client, NULL, NULL);
    }
    double wall = clock_s(CLOCK_MONOTONIC) - t0;
    double host_cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    double process_cpu = process_cpu_s() - process0;
    ws_client_free(client);
    ws_options_free(options);
    if (run.failed) return 1;

    if (args.mode == RECONNECT) {
        printf("{\"client\":\"wsclient\",\"mode\":\"reconnect\",\"count\":%ld,\"wall_s\":%.6f,"
               "\"wall_us_per_connect\":%.1f,\"process_cpu_us_per_connect\":%.1f,\"host_thread_cpu_s\":%.6f}\n",
               args.count, wall, wall / args.count * 1e6, process_cpu / args.count * 1e6, host_cpu);
        return 0;
    }

    long count = args.mode == CONNS ? args.conns : run.received;
    printf("{\"client\":\"wsclient\",\"mode\":\"%s\",\"size\":%ld,\"count\":%ld,\"wall_s\":%.6f,"
           "\"msgs_per_s\":%.1f,\"mb_per_s\":%.3f,\"peak_rss_kib\":%ld,\"host_thread_cpu_s\":%.6f}\n",
           args.mode_name, args.size, count, wall, count / wall, run.rx_bytes / wall / 1e6, peak_rss_kib(), host_cpu);
    free(run.payload);
    free(run.conns);
    return 0;
}
