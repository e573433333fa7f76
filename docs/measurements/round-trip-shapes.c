/*
 * round-trip-shapes: the skeletons of five client architectures for one WebSocket request/reply
 * round trip (the shared harness's W1: 64 B of text echoed), with no library around them, to
 * measure what the architecture alone costs on a machine: the figures behind #10's choices (see
 * BENCHMARKS.md, "Round trip shapes"). Linux only.
 *
 *   cc -O2 -o /tmp/shapes docs/measurements/round-trip-shapes.c -lpthread
 *   taskset -c 0 ../shared/bench/target/release/wsbench-server --port 18801 &
 *   for i in $(seq 25); do for m in single nested eventfd eventfd-et futex; do
 *     taskset -c 1 /tmp/shapes $m 18801 10000; done; done
 *
 * MODE: single      one thread: epoll_wait on the socket, recv, send (libwebsockets' shape, and
 *                   what reading on the host's thread would be)
 *       nested      one thread, the host's: epoll_wait on its loop's epoll, which holds an epoll
 *                   instance holding the socket and an eventfd; a harvest of that instance
 *                   (epoll_wait, no waiting), recv, send (wsclient's shape with
 *                   ws_options_set_read_on_dispatch, the default on Linux)
 *       eventfd     an I/O thread: epoll_wait, recv, eventfd write; the host thread: epoll_wait on
 *                   the eventfd (level-triggered), read it, send (wsclient's shape with a
 *                   level-triggered host loop)
 *       eventfd-et  the same, the host watching the eventfd edge-triggered and never reading it
 *                   (wsclient's shape after ws_client_set_fd_edge_triggered)
 *       futex       an I/O thread: epoll_wait, futex wake; the host thread: futex wait, recv, send
 *                   (tokio-tungstenite's shape: block_on on the main thread)
 * HOP_TIMEOUT=MS gives every epoll_wait a timeout (to measure what an armed timer costs).
 * Prints the process's user+sys CPU and the wall time per round trip, in microseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int sock, efd, tmo = -1;
static long count;
static unsigned char frame[6 + 64];
static unsigned char inbuf[4096];
static _Atomic int got; /* futex word: replies the I/O thread saw */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void handshake(int port) {
    sock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(sock, (void *)&a, sizeof a)) die("connect");
    int one = 1;
    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     port);
    if (write(sock, req, n) != n) die("write");
    char resp[2048];
    int got_bytes = 0;
    while (!strstr(resp, "\r\n\r\n")) {
        int r = read(sock, resp + got_bytes, sizeof resp - 1 - got_bytes);
        if (r <= 0) die("handshake");
        got_bytes += r;
        resp[got_bytes] = 0;
    }
    if (strncmp(resp, "HTTP/1.1 101", 12)) die("not 101");
    frame[0] = 0x81;
    frame[1] = 0x80 | 64;
    memset(frame + 2, 0x5a, 4);
    for (int i = 0; i < 64; i++) frame[6 + i] = 'x' ^ 0x5a;
}

static void send_one(void) {
    if (send(sock, frame, sizeof frame, MSG_NOSIGNAL) != sizeof frame) die("send");
}

/* Reads what has arrived without waiting; returns how many bytes (0 if none). */
static long recv_some(void) {
    long r = recv(sock, inbuf, sizeof inbuf, MSG_DONTWAIT);
    return r < 0 ? 0 : r;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

static void *io_thread_eventfd(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET};
    epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev);
    long have = 0;
    for (long i = 0; i < count;) {
        epoll_wait(ep, &ev, 1, tmo);
        long r;
        while ((r = recv_some()) > 0) have += r;
        while (have >= 66) {
            have -= 66;
            i++;
            uint64_t one = 1;
            if (write(efd, &one, 8) != 8) die("eventfd write");
        }
    }
    return NULL;
}

static void *io_thread_futex(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET};
    epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev);
    for (long i = 0; i < count; i++) {
        epoll_wait(ep, &ev, 1, tmo);
        atomic_fetch_add(&got, 1);
        syscall(SYS_futex, &got, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: round-trip-shapes single|nested|eventfd|eventfd-et|futex PORT COUNT\n");
        return 2;
    }
    const char *mode = argv[1];
    if (getenv("HOP_TIMEOUT")) tmo = atoi(getenv("HOP_TIMEOUT"));
    handshake(atoi(argv[2]));
    count = atol(argv[3]);
    double c0 = cpu_s();
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (!strcmp(mode, "single")) {
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN};
        epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev);
        long have = 0;
        send_one();
        for (long i = 0; i < count;) {
            epoll_wait(ep, &ev, 1, tmo);
            have += recv_some();
            while (have >= 66) {
                have -= 66;
                if (++i < count) send_one();
            }
        }
    } else if (!strcmp(mode, "nested")) {
        /* The host's loop (outer) watches the library's descriptor, an epoll instance (inner)
           holding the socket and the wake-up eventfd; a dispatch harvests the inner one. */
        int inner = epoll_create1(0), outer = epoll_create1(0);
        efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLET};
        epoll_ctl(inner, EPOLL_CTL_ADD, sock, &ev);
        epoll_ctl(inner, EPOLL_CTL_ADD, efd, &ev);
        epoll_ctl(outer, EPOLL_CTL_ADD, inner, &ev);
        long have = 0;
        send_one();
        for (long i = 0; i < count;) {
            epoll_wait(outer, &ev, 1, tmo);
            struct epoll_event got_ev[8];
            epoll_wait(inner, got_ev, 8, 0);
            have += recv_some();
            while (have >= 66) {
                have -= 66;
                if (++i < count) send_one();
            }
        }
    } else if (!strcmp(mode, "eventfd") || !strcmp(mode, "eventfd-et")) {
        int et = !strcmp(mode, "eventfd-et");
        efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN | (et ? EPOLLET : 0)};
        epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
        pthread_t t;
        pthread_create(&t, NULL, io_thread_eventfd, NULL);
        send_one();
        for (long i = 0; i < count;) {
            epoll_wait(ep, &ev, 1, tmo);
            uint64_t n = 1;
            if (!et && read(efd, &n, 8) != 8) continue;
            for (uint64_t k = 0; k < n && i < count; k++)
                if (++i < count) send_one();
        }
        pthread_join(t, NULL);
    } else if (!strcmp(mode, "futex")) {
        pthread_t t;
        pthread_create(&t, NULL, io_thread_futex, NULL);
        long have = 0;
        int seen = 0;
        send_one();
        for (long i = 0; i < count;) {
            while (atomic_load(&got) == seen) syscall(SYS_futex, &got, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            seen = atomic_load(&got);
            have += recv_some();
            while (have >= 66) {
                have -= 66;
                if (++i < count) send_one();
            }
        }
        pthread_join(t, NULL);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double cpu = cpu_s() - c0, wall = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("%s cpu_us_per_rt %.2f wall_us_per_rt %.2f\n", mode, cpu / count * 1e6, wall / count * 1e6);
    return 0;
}
