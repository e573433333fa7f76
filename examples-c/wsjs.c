/*
 * wsjs: runs a JavaScript file in Duktape with the documented WebsocketClient objects, bound
 * through wsclient's public C API only. It is also the reference for binding another engine.
 *
 *   wsjs SCRIPT.js
 *
 * Globals: WebsocketClient.connect(uri), log(...), setTimeout(fn, ms), clearTimeout(id), and
 * memoryUsage() ({rss, peakRss, heapUsed} in bytes, for tests).
 * After the script has run, the event loop (poll on the library's fd, plus timers) runs until
 * no connection and no timer is left; then wsjs exits 0. An uncaught exception, at top level or
 * in a callback, prints its stack to stderr and exits 1.
 *
 * Strings: Duktape keeps strings in CESU-8 (characters outside the BMP as surrogate pairs), the
 * library speaks UTF-8: every string crossing the boundary is converted here.
 *
 * The two rules of README's "Binding another engine" live in protected() (a callback returns
 * normally, whatever throws inside it) and pace_gc() (the bytes of messages count toward
 * Duktape's garbage collector).
 *
 * For tests: WSJS_HEAP_LIMIT=BYTES caps the bytes Duktape may hold, so that a test can make an
 * allocation fail where it likes (inside a callback, for instance).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <malloc.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <duktape.h>

#include "wsclient.h"

/* Hidden properties (Duktape hides keys starting with 0xFF) of a connection object. */
#define KEY_HANDLE "\xff" "handle"
#define KEY_GONE "\xff" "gone"
#define KEY_ON(name) ("\xff" "on" name)

struct timer {
    double id;
    double deadline_ms;
};

/* The host: one per process, used from the one thread that runs JavaScript. */
static struct {
    duk_context *ctx;
    ws_client *client;
    int fatal;             /* an uncaught exception happened: stop running JavaScript */
    struct timer *timers;
    size_t ntimers, cap;
    double next_timer_id;
    size_t heap_bytes;     /* what Duktape holds from heap_alloc/heap_realloc */
    size_t heap_limit;     /* WSJS_HEAP_LIMIT (0: none) */
    size_t handed;         /* message bytes handed to Duktape since wsjs last collected */
    size_t live;           /* heap_bytes just after wsjs last collected */
} host;

/* ---- Duktape's allocator ------------------------------------------------------------------ */

/* malloc, counting what Duktape holds (malloc_usable_size: no header of our own) and refusing
 * past host.heap_limit. Duktape answers a refusal by collecting, retrying, then throwing
 * Error("alloc failed"); only the host thread allocates, so plain counters do. */
static int heap_refuses(size_t more) {
    return host.heap_limit && host.heap_bytes + more > host.heap_limit;
}

static void *heap_alloc(void *udata, duk_size_t size) {
    (void)udata;
    if (heap_refuses(size)) return NULL;
    void *p = malloc(size);
    if (p) host.heap_bytes += malloc_usable_size(p);
    return p;
}

static void heap_free(void *udata, void *ptr) {
    (void)udata;
    if (!ptr) return;
    host.heap_bytes -= malloc_usable_size(ptr);
    free(ptr);
}

static void *heap_realloc(void *udata, void *ptr, duk_size_t size) {
    if (!ptr) return heap_alloc(udata, size);
    if (size == 0) {
        heap_free(udata, ptr);
        return NULL;
    }
    size_t old = malloc_usable_size(ptr);
    if (size > old && heap_refuses(size - old)) return NULL;
    void *p = realloc(ptr, size);
    if (!p) return NULL; /* ptr is untouched and still counted */
    host.heap_bytes = host.heap_bytes - old + malloc_usable_size(p);
    return p;
}

/* An error nothing caught: Duktape cannot go on, and returning is not allowed. */
static void heap_fatal(void *udata, const char *msg) {
    (void)udata;
    fprintf(stderr, "wsjs: fatal Duktape error: %s\n", msg ? msg : "(no message)");
    fflush(stderr);
    abort();
}

/* ---- garbage collection paced by the bytes of messages ----------------------------------- *
 * Reference counting frees most garbage at once, but not cycles, and every JavaScript function
 * is one (f.prototype.constructor === f): a closure that saw a message, such as one that
 * completes it later from a timer, keeps the message until a mark-and-sweep. Duktape starts one
 * after a number of allocations, whatever their sizes, so 1 MiB messages piled up by the
 * gigabyte. wsjs therefore counts the bytes of the messages it hands Duktape and collects once
 * they would pass max(8 MiB, the live heap after the last collection). 8 MiB keeps a small
 * script's garbage far under the 32 MiB its test allows, while a collection of a small heap
 * costs little even every 8 messages of 1 MiB; the live-heap term keeps a script that holds much from paying a full collection (whose work grows with the
 * live heap) every 8 MiB, so that the collecting stays proportional to the bytes received, as
 * with Lua's and Go's pacers (the heap may reach twice its live size). Measured with a script
 * that keeps 300,000 objects (about 70 MB) over 2 GiB of 1 MiB messages: 19.4 s of CPU with a
 * fixed 8 MiB, 5.0 s with this rule, for 50 MB more at the peak. */
#define GC_MIN_BYTES ((size_t)8 << 20)

/* Called before a message of `bytes` is handed to Duktape: collects first if the bytes handed
 * since the last collection would pass the threshold. */
static void pace_gc(duk_context *ctx, size_t bytes) {
    size_t threshold = host.live > GC_MIN_BYTES ? host.live : GC_MIN_BYTES;
    if (host.handed + bytes > threshold) {
        duk_gc(ctx, 0);
        host.handed = 0;
        host.live = host.heap_bytes;
    }
    host.handed += bytes;
}

/* ---- UTF-8 <-> CESU-8 ------------------------------------------------------------------- */

static size_t put3(unsigned char *out, unsigned u) {
    out[0] = (unsigned char)(0xE0 | (u >> 12));
    out[1] = (unsigned char)(0x80 | ((u >> 6) & 0x3F));
    out[2] = (unsigned char)(0x80 | (u & 0x3F));
    return 3;
}

/* UTF-8 from the library -> CESU-8 for Duktape, into out (room for n + n / 2 bytes: a 4-byte
 * sequence becomes a surrogate pair, 6 bytes); returns the length written. */
static size_t cesu8_from_utf8(const unsigned char *s, size_t n, unsigned char *out) {
    unsigned char *o = out;
    for (size_t i = 0; i < n;) {
        if (s[i] >= 0xF0 && i + 3 < n) {
            unsigned cp = ((s[i] & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) |
                          (s[i + 3] & 0x3Fu);
            cp -= 0x10000;
            o += put3(o, 0xD800 + (cp >> 10));
            o += put3(o, 0xDC00 + (cp & 0x3FF));
            i += 4;
        } else {
            *o++ = s[i++];
        }
    }
    return (size_t)(o - out);
}

/* The same, malloc'd and NUL-terminated (caller frees); NULL if out of memory. */
static unsigned char *utf8_to_cesu8(const unsigned char *s, size_t n, size_t *out_len) {
    unsigned char *out = malloc(n + n / 2 + 1);
    if (!out) return NULL;
    *out_len = cesu8_from_utf8(s, n, out);
    out[*out_len] = 0;
    return out;
}

/* The code unit of a 3-byte sequence at s (no checks beyond the lead byte's range). */
static unsigned surrogate_at(const unsigned char *s, size_t left) {
    if (left < 3 || s[0] != 0xED || s[1] < 0xA0) return 0;
    return ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
}

/* CESU-8 from Duktape -> UTF-8: surrogate pairs join, lone surrogates become U+FFFD (as a
 * browser's send() does). */
static unsigned char *cesu8_to_utf8(const unsigned char *s, size_t n, size_t *out_len) {
    unsigned char *out = malloc(n + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n;) {
        unsigned hi = surrogate_at(s + i, n - i);
        if (!hi) {
            *o++ = s[i++];
            continue;
        }
        unsigned lo = surrogate_at(s + i + 3, n - i - 3);
        if (hi <= 0xDBFF && lo >= 0xDC00) {
            unsigned cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
            *o++ = (unsigned char)(0xF0 | (cp >> 18));
            *o++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
            *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
            *o++ = (unsigned char)(0x80 | (cp & 0x3F));
            i += 6;
        } else {
            o += put3(o, 0xFFFD);
            i += 3;
        }
    }
    *o = 0; /* also a C string */
    *out_len = (size_t)(o - out);
    return out;
}

/* Pushes a UTF-8 string as a JavaScript string. Only Duktape allocates here, so that a push
 * that throws (out of memory) leaks nothing: without characters outside the BMP, UTF-8 is
 * already CESU-8 and goes as it is; otherwise the conversion uses a Duktape buffer. */
static void push_utf8(duk_context *ctx, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n && u[i] < 0xF0) i++;
    if (i == n) {
        duk_push_lstring(ctx, s, n);
        return;
    }
    unsigned char *scratch = duk_push_fixed_buffer(ctx, n + n / 2);
    size_t len = cesu8_from_utf8(u, n, scratch);
    duk_push_lstring(ctx, (const char *)scratch, len);
    duk_remove(ctx, -2);
}

/* The value at idx as a malloc'd UTF-8 string (caller frees). */
static char *to_utf8(duk_context *ctx, duk_idx_t idx, size_t *len) {
    duk_size_t n;
    const char *s = duk_safe_to_lstring(ctx, idx, &n);
    char *utf8 = (char *)cesu8_to_utf8((const unsigned char *)s, n, len);
    if (!utf8) duk_error(ctx, DUK_ERR_ERROR, "out of memory");
    return utf8;
}

/* ---- errors ------------------------------------------------------------------------------ */

/* [error] -> [text]: its stack trace if it has one, else its string value. Run protected: a
 * getter or an allocation can throw here too. */
static duk_ret_t describe_error(duk_context *ctx, void *arg) {
    (void)arg;
    if (duk_is_error(ctx, -1) && duk_get_prop_string(ctx, -1, "stack")) duk_replace(ctx, -2);
    else if (duk_is_error(ctx, -1)) duk_pop(ctx);
    duk_to_string(ctx, -1);
    return 1;
}

/* Prints the error on top of the stack (and pops it) and marks the host fatal: wsjs exits 1
 * once control is back in the event loop. Throws nothing, even out of memory. */
static void report_uncaught(duk_context *ctx) {
    const char *cesu = NULL;
    duk_size_t n = 0;
    if (duk_safe_call(ctx, describe_error, NULL, 1, 1) == DUK_EXEC_SUCCESS)
        cesu = duk_get_lstring(ctx, -1, &n);
    size_t len;
    char *utf8 = cesu ? (char *)cesu8_to_utf8((const unsigned char *)cesu, n, &len) : NULL;
    const char *text = utf8 ? utf8 : cesu ? cesu : "(out of memory while describing it)";
    fprintf(stderr, "uncaught exception: %s\n", text);
    fflush(stderr);
    free(utf8);
    duk_pop(ctx);
    host.fatal = 1;
}

/* Runs body(ctx, arg) inside duk_safe_call, reporting an error as uncaught. Every entry into
 * Duktape from C goes through here, above all the library's callbacks: a Duktape error is a
 * longjmp to the innermost catchpoint, and one taken from inside a callback would skip the
 * library's frames (ws_dispatch's) and leave the client wedged. So whatever throws in a
 * callback (the script, or a push that runs out of memory) stops here, and the callback returns
 * normally to the library; the event loop then sees host.fatal and exits 1. After an uncaught
 * exception nothing runs any more, as Node does. 0 when body returned normally. */
static int protected(duk_context *ctx, duk_safe_call_function body, void *arg) {
    if (host.fatal) return -1;
    if (duk_safe_call(ctx, body, arg, 0, 1) != DUK_EXEC_SUCCESS) {
        report_uncaught(ctx);
        return -1;
    }
    duk_pop(ctx);
    return 0;
}

/* Throws a JavaScript Error carrying the library's message for a failed call. */
static duk_ret_t throw_status(duk_context *ctx, ws_status status) {
    return duk_error(ctx, DUK_ERR_ERROR, "%s", status == WS_STATUS_GONE ? "the connection is gone" : ws_last_error());
}

/* ---- connection objects ------------------------------------------------------------------ */

static void push_handle_key(duk_context *ctx, ws_conn conn) {
    char key[24];
    snprintf(key, sizeof key, "%" PRIx64, conn);
    duk_push_string(ctx, key);
}

/* Pushes the live connection object for conn (from the stash), or undefined. */
static void push_conn_object(duk_context *ctx, ws_conn conn) {
    duk_push_heap_stash(ctx);
    duk_get_prop_string(ctx, -1, "conns");
    push_handle_key(ctx, conn);
    duk_get_prop(ctx, -2);
    duk_replace(ctx, -3);
    duk_pop(ctx);
}

/* The handle of `this`; throws if the connection is gone. */
static ws_conn this_handle(duk_context *ctx) {
    duk_push_this(ctx);
    duk_get_prop_string(ctx, -1, KEY_GONE);
    int gone = duk_to_boolean(ctx, -1);
    duk_get_prop_string(ctx, -2, KEY_HANDLE);
    ws_conn conn = (ws_conn)strtoull(duk_safe_to_string(ctx, -1), NULL, 16);
    duk_pop_3(ctx);
    if (gone || conn == 0) duk_error(ctx, DUK_ERR_ERROR, "the connection is gone");
    return conn;
}

/* conn.onopen(fn) and friends: store fn (or clear it with null/undefined), return this. */
static duk_ret_t set_callback(duk_context *ctx, const char *key) {
    this_handle(ctx);
    if (!duk_is_function(ctx, 0) && !duk_is_null_or_undefined(ctx, 0))
        return duk_error(ctx, DUK_ERR_TYPE_ERROR, "callback must be a function");
    duk_push_this(ctx);
    duk_dup(ctx, 0);
    duk_put_prop_string(ctx, -2, key);
    return 1;
}
static duk_ret_t js_onopen(duk_context *ctx) { return set_callback(ctx, KEY_ON("open")); }
static duk_ret_t js_onclose(duk_context *ctx) { return set_callback(ctx, KEY_ON("close")); }
static duk_ret_t js_onerror(duk_context *ctx) { return set_callback(ctx, KEY_ON("error")); }
static duk_ret_t js_onmessage(duk_context *ctx) { return set_callback(ctx, KEY_ON("message")); }

/* conn.send(data): a string goes as text, a buffer (Uint8Array, ArrayBuffer, ...) as binary. */
static duk_ret_t js_send(duk_context *ctx) {
    ws_conn conn = this_handle(ctx);
    ws_status status;
    if (duk_is_buffer_data(ctx, 0)) {
        duk_size_t len;
        void *data = duk_get_buffer_data(ctx, 0, &len);
        status = ws_send_binary(conn, data, len);
    } else {
        size_t len;
        char *text = to_utf8(ctx, 0, &len);
        status = ws_send(conn, text, len);
        free(text);
    }
    /* While the connection is closing (or failed and its onclose/onerror is on its way) a
     * message is discarded, as browsers do; only a gone connection or bad data throws. */
    if (status != WS_STATUS_OK && status != WS_STATUS_CLOSING) return throw_status(ctx, status);
    duk_push_this(ctx);
    return 1;
}

/* conn.close([code[, reason]]): a second close, or one during the final callback, is a no-op. */
static duk_ret_t js_close(duk_context *ctx) {
    ws_conn conn = this_handle(ctx);
    uint16_t code = duk_is_undefined(ctx, 0) ? 0 : (uint16_t)duk_to_uint16(ctx, 0);
    ws_status status;
    if (duk_is_undefined(ctx, 1)) {
        status = ws_close(conn, code, NULL);
    } else {
        /* By length: a reason holding "\u0000" is sent whole (ws_close would stop at the NUL). */
        size_t len;
        char *reason = to_utf8(ctx, 1, &len);
        status = ws_close_with_reason(conn, code, reason, len);
        free(reason);
    }
    if (status != WS_STATUS_OK && status != WS_STATUS_ALREADY_CLOSING && status != WS_STATUS_CLOSING)
        return throw_status(ctx, status);
    duk_push_this(ctx);
    return 1;
}

static duk_ret_t js_set_flow_control(duk_context *ctx) {
    ws_status status = ws_set_flow_control(this_handle(ctx), duk_to_boolean(ctx, 0));
    if (status != WS_STATUS_OK) return throw_status(ctx, status);
    duk_push_this(ctx);
    return 1;
}

static duk_ret_t js_message_complete(duk_context *ctx) {
    ws_status status = ws_message_complete(this_handle(ctx));
    if (status != WS_STATUS_OK) return throw_status(ctx, status);
    duk_push_this(ctx);
    return 1;
}

/* ---- library callbacks -> JavaScript ----------------------------------------------------- */

/* What a library callback received, for its body (which runs protected, see protected()). */
struct event {
    ws_conn conn;
    const uint8_t *data;     /* message */
    size_t len;
    ws_message_kind kind;
    uint16_t code;           /* close */
    const char *text;        /* close reason, error message */
    size_t text_len;
};

/* Pushes [fn obj obj] for conn[key](conn, ...) and returns 1; returns 0, pushing nothing, when
 * the connection has no object or no such callback. */
static int push_handler(duk_context *ctx, ws_conn conn, const char *key) {
    push_conn_object(ctx, conn);            /* [obj] */
    if (!duk_is_object(ctx, -1)) {
        duk_pop(ctx);
        return 0;
    }
    duk_get_prop_string(ctx, -1, key);      /* [obj fn] */
    if (!duk_is_function(ctx, -1)) {
        duk_pop_2(ctx);
        return 0;
    }
    duk_insert(ctx, -2);                    /* [fn obj]: this */
    duk_dup_top(ctx);                       /* [fn obj obj]: the first argument */
    return 1;
}

/* After the final callback: the object is gone and no longer kept alive by the host. */
static void forget(duk_context *ctx, ws_conn conn) {
    push_conn_object(ctx, conn);
    if (duk_is_object(ctx, -1)) {
        duk_push_true(ctx);
        duk_put_prop_string(ctx, -2, KEY_GONE);
    }
    duk_pop(ctx);
    duk_push_heap_stash(ctx);
    duk_get_prop_string(ctx, -1, "conns");
    push_handle_key(ctx, conn);
    duk_del_prop(ctx, -2);
    duk_pop_2(ctx);
}

/* The bodies: each runs inside protected(), so a throw anywhere in them (duk_call included)
 * unwinds to there and never into the library. */

static duk_ret_t open_body(duk_context *ctx, void *arg) {
    const struct event *ev = arg;
    if (push_handler(ctx, ev->conn, KEY_ON("open"))) duk_call_method(ctx, 1);
    return 0;
}

static duk_ret_t message_body(duk_context *ctx, void *arg) {
    const struct event *ev = arg;
    if (!push_handler(ctx, ev->conn, KEY_ON("message"))) return 0;
    pace_gc(ctx, ev->len);
    if (ev->kind == WS_MESSAGE_KIND_TEXT) {
        push_utf8(ctx, (const char *)ev->data, ev->len);
    } else {
        void *copy = duk_push_fixed_buffer(ctx, ev->len);
        if (ev->len) memcpy(copy, ev->data, ev->len);
        duk_push_buffer_object(ctx, -1, 0, ev->len, DUK_BUFOBJ_UINT8ARRAY);
        duk_remove(ctx, -2);
    }
    duk_call_method(ctx, 2);
    return 0;
}

static duk_ret_t close_body(duk_context *ctx, void *arg) {
    const struct event *ev = arg;
    if (push_handler(ctx, ev->conn, KEY_ON("close"))) {
        duk_push_uint(ctx, ev->code);
        push_utf8(ctx, ev->text, ev->text_len);
        duk_call_method(ctx, 3);
    }
    forget(ctx, ev->conn);
    return 0;
}

static duk_ret_t error_body(duk_context *ctx, void *arg) {
    const struct event *ev = arg;
    if (push_handler(ctx, ev->conn, KEY_ON("error"))) {
        push_utf8(ctx, ev->text, ev->text_len);
        duk_call_method(ctx, 2);
    }
    forget(ctx, ev->conn);
    return 0;
}

/* The library's callbacks: they always return normally (see protected()). */

static void on_open(ws_conn conn, void *user) {
    struct event ev = {.conn = conn};
    protected(user, open_body, &ev);
}

static void on_message(ws_conn conn, const uint8_t *data, size_t len, ws_message_kind kind, void *user) {
    struct event ev = {.conn = conn, .data = data, .len = len, .kind = kind};
    protected(user, message_body, &ev);
}

static void on_close(ws_conn conn, uint16_t code, const char *reason, size_t reason_len, void *user) {
    struct event ev = {.conn = conn, .code = code, .text = reason, .text_len = reason_len};
    protected(user, close_body, &ev);
}

static void on_error(ws_conn conn, ws_status kind, const char *message, void *user) {
    struct event ev = {.conn = conn, .text = message, .text_len = strlen(message)};
    (void)kind;
    protected(user, error_body, &ev);
}

/* WebsocketClient.connect(uri) */
static duk_ret_t js_connect(duk_context *ctx) {
    size_t len;
    char *uri = to_utf8(ctx, 0, &len);
    ws_conn conn;
    ws_status status = ws_connect(host.client, uri, &conn);
    free(uri);
    if (status != WS_STATUS_OK) return duk_error(ctx, DUK_ERR_ERROR, "%s", ws_last_error());
    ws_on_open(conn, on_open, ctx);
    ws_on_message(conn, on_message, ctx);
    ws_on_close(conn, on_close, ctx);
    ws_on_error(conn, on_error, ctx);

    duk_push_object(ctx);                               /* the WebsocketClientConnection */
    duk_push_heap_stash(ctx);
    duk_get_prop_string(ctx, -1, "proto");
    duk_set_prototype(ctx, -3);
    duk_pop(ctx);                                       /* [obj] */
    push_handle_key(ctx, conn);
    duk_put_prop_string(ctx, -2, KEY_HANDLE);
    duk_push_heap_stash(ctx);                           /* stash.conns[key] = obj until gone */
    duk_get_prop_string(ctx, -1, "conns");
    push_handle_key(ctx, conn);
    duk_dup(ctx, -4);
    duk_put_prop(ctx, -3);
    duk_pop_2(ctx);
    return 1;
}

/* ---- log and timers ---------------------------------------------------------------------- */

static duk_ret_t js_log(duk_context *ctx) {
    duk_idx_t n = duk_get_top(ctx);
    for (duk_idx_t i = 0; i < n; i++) {
        size_t len;
        char *text = to_utf8(ctx, i, &len);
        if (i) fputc(' ', stdout);
        fwrite(text, 1, len, stdout);
        free(text);
    }
    fputc('\n', stdout);
    fflush(stdout);
    return 0;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void push_timers(duk_context *ctx) {
    duk_push_heap_stash(ctx);
    duk_get_prop_string(ctx, -1, "timers");
    duk_remove(ctx, -2);
}

/* setTimeout(fn, ms) -> id */
static duk_ret_t js_set_timeout(duk_context *ctx) {
    if (!duk_is_function(ctx, 0)) return duk_error(ctx, DUK_ERR_TYPE_ERROR, "setTimeout needs a function");
    double ms = duk_is_undefined(ctx, 1) ? 0 : duk_to_number(ctx, 1);
    if (!(ms > 0)) ms = 0;
    if (host.ntimers == host.cap) {
        size_t cap = host.cap ? host.cap * 2 : 16;
        struct timer *t = realloc(host.timers, cap * sizeof *t);
        if (!t) return duk_error(ctx, DUK_ERR_ERROR, "out of memory");
        host.timers = t;
        host.cap = cap;
    }
    double id = ++host.next_timer_id;
    host.timers[host.ntimers++] = (struct timer){id, now_ms() + ms};
    push_timers(ctx);
    duk_push_number(ctx, id);
    duk_dup(ctx, 0);
    duk_put_prop(ctx, -3);
    duk_push_number(ctx, id);
    return 1;
}

static void remove_timer(duk_context *ctx, double id) {
    for (size_t i = 0; i < host.ntimers; i++) {
        if (host.timers[i].id == id) {
            host.timers[i] = host.timers[--host.ntimers];
            push_timers(ctx);
            duk_push_number(ctx, id);
            duk_del_prop(ctx, -2);
            duk_pop(ctx);
            return;
        }
    }
}

/* clearTimeout(id) */
static duk_ret_t js_clear_timeout(duk_context *ctx) {
    if (duk_is_number(ctx, 0)) remove_timer(ctx, duk_get_number(ctx, 0));
    return 0;
}

/* Milliseconds until the next timer (-1: none). */
static int next_timer_timeout(void) {
    if (!host.ntimers) return -1;
    double first = host.timers[0].deadline_ms;
    for (size_t i = 1; i < host.ntimers; i++)
        if (host.timers[i].deadline_ms < first) first = host.timers[i].deadline_ms;
    double wait = first - now_ms();
    return wait <= 0 ? 0 : (int)(wait + 1);
}

/* Runs the timer *(double *)arg once (protected). */
static duk_ret_t timer_body(duk_context *ctx, void *arg) {
    double id = *(const double *)arg;
    push_timers(ctx);
    duk_push_number(ctx, id);
    duk_get_prop(ctx, -2);                  /* [timers fn] */
    remove_timer(ctx, id);
    duk_call(ctx, 0);
    return 0;
}

/* Runs the timers that are due, earliest first (ties in creation order). */
static void run_due_timers(duk_context *ctx) {
    for (;;) {
        double now = now_ms();
        size_t best = host.ntimers;
        for (size_t i = 0; i < host.ntimers; i++) {
            struct timer *t = &host.timers[i];
            if (t->deadline_ms > now) continue;
            if (best == host.ntimers || t->deadline_ms < host.timers[best].deadline_ms ||
                (t->deadline_ms == host.timers[best].deadline_ms && t->id < host.timers[best].id))
                best = i;
        }
        if (best == host.ntimers || host.fatal) return;
        double id = host.timers[best].id;
        protected(ctx, timer_body, &id);
    }
}

/* The process's peak resident size in bytes (VmHWM, the kernel's high-water mark of this
 * program's memory since exec), -1 if unknown. */
static double peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[128];
    double kib = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %lf kB", &kib) == 1) break;
    fclose(f);
    return kib < 0 ? -1 : kib * 1024;
}

/* memoryUsage() -> {rss, peakRss, heapUsed}: the process's resident size, its peak since it
 * started, and the bytes malloc has handed out and not taken back (all threads, Duktape's heap
 * and the library included). A wsjs extra, used by its tests: heapUsed is exact where RSS moves
 * with the allocator's caching, and peakRss misses no transient peak. */
static duk_ret_t js_memory_usage(duk_context *ctx) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    if (f) fclose(f);
    struct mallinfo2 heap = mallinfo2();
    duk_push_object(ctx);
    duk_push_number(ctx, resident < 0 ? -1 : (double)resident * (double)sysconf(_SC_PAGESIZE));
    duk_put_prop_string(ctx, -2, "rss");
    duk_push_number(ctx, peak_rss());
    duk_put_prop_string(ctx, -2, "peakRss");
    duk_push_number(ctx, (double)(heap.uordblks + heap.hblkhd));
    duk_put_prop_string(ctx, -2, "heapUsed");
    return 1;
}

/* ---- set-up and the event loop ----------------------------------------------------------- */

/* Defines wsjs's globals (protected). */
static duk_ret_t define_globals(duk_context *ctx, void *arg) {
    (void)arg;
    static const duk_function_list_entry methods[] = {
        {"onopen", js_onopen, 1},           {"onclose", js_onclose, 1},
        {"onerror", js_onerror, 1},         {"onmessage", js_onmessage, 1},
        {"send", js_send, 1},               {"close", js_close, 2},
        {"setFlowControl", js_set_flow_control, 1},
        {"messageComplete", js_message_complete, 0},
        {NULL, NULL, 0}};
    duk_push_heap_stash(ctx);
    duk_push_object(ctx);
    duk_put_function_list(ctx, -1, methods);
    duk_put_prop_string(ctx, -2, "proto");
    duk_push_object(ctx);
    duk_put_prop_string(ctx, -2, "conns");
    duk_push_object(ctx);
    duk_put_prop_string(ctx, -2, "timers");
    duk_pop(ctx);

    duk_push_object(ctx);
    duk_push_c_function(ctx, js_connect, 1);
    duk_put_prop_string(ctx, -2, "connect");
    duk_put_global_string(ctx, "WebsocketClient");
    duk_push_c_function(ctx, js_log, DUK_VARARGS);
    duk_put_global_string(ctx, "log");
    duk_push_c_function(ctx, js_set_timeout, 2);
    duk_put_global_string(ctx, "setTimeout");
    duk_push_c_function(ctx, js_clear_timeout, 1);
    duk_put_global_string(ctx, "clearTimeout");
    duk_push_c_function(ctx, js_memory_usage, 0);
    duk_put_global_string(ctx, "memoryUsage");
    return 0;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    *len = n;
    return buf;
}

struct script {
    const char *path;
    const unsigned char *source;  /* CESU-8 */
    size_t len;
};

/* Compiles and runs the script (protected). */
static duk_ret_t script_body(duk_context *ctx, void *arg) {
    const struct script *script = arg;
    duk_push_lstring(ctx, (const char *)script->source, script->len);
    duk_push_string(ctx, script->path);
    duk_compile(ctx, DUK_COMPILE_SHEBANG);
    duk_call(ctx, 0);
    return 0;
}

/* Runs the script at path (UTF-8 source, converted for Duktape). 0 on success. */
static int run_script(duk_context *ctx, const char *path) {
    size_t len;
    char *source = read_file(path, &len);
    if (!source) {
        fprintf(stderr, "wsjs: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    struct script script = {.path = path};
    unsigned char *cesu = utf8_to_cesu8((unsigned char *)source, len, &script.len);
    free(source);
    if (!cesu) return -1;
    script.source = cesu;
    int rc = protected(ctx, script_body, &script);
    free(cesu);
    return rc;
}

/* Calls ws_dispatch outside any Duktape call: each callback enters Duktape by protected(). */
static void event_loop(duk_context *ctx) {
    struct pollfd pfd = {.fd = ws_client_fd(host.client), .events = POLLIN};
    while (!host.fatal && (ws_client_connection_count(host.client) > 0 || host.ntimers > 0)) {
        int n = poll(&pfd, 1, next_timer_timeout());
        if (n < 0 && errno != EINTR) {
            perror("wsjs: poll");
            host.fatal = 1;
            break;
        }
        if (n > 0 && ws_dispatch(host.client, NULL, NULL) != WS_STATUS_OK) {
            fprintf(stderr, "wsjs: dispatch: %s\n", ws_last_error());
            host.fatal = 1;
        }
        run_due_timers(ctx);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRIPT.js\n", argv[0]);
        return 2;
    }
    host.client = ws_client_new();
    host.ctx = duk_create_heap(heap_alloc, heap_realloc, heap_free, NULL, heap_fatal);
    if (!host.client || !host.ctx) {
        fprintf(stderr, "wsjs: cannot start: %s\n", ws_last_error());
        return 1;
    }
    /* The cap starts once the heap exists: Duktape 2.2 overflows its stack (endless error
     * objects) if an allocation fails while it creates its built-ins. */
    const char *limit = getenv("WSJS_HEAP_LIMIT");
    if (limit) host.heap_limit = strtoull(limit, NULL, 10);
    if (protected(host.ctx, define_globals, NULL) == 0 && run_script(host.ctx, argv[1]) == 0)
        event_loop(host.ctx);
    /* No callback runs after this. It fails (dispatch in progress) if a callback ever left
     * ws_dispatch other than by returning: say so, it is a bug in wsjs. */
    if (ws_client_free(host.client) != WS_STATUS_OK) {
        fprintf(stderr, "wsjs: ws_client_free: %s\n", ws_last_error());
        host.fatal = 1;
    }
    duk_destroy_heap(host.ctx);
    free(host.timers);
    return host.fatal ? 1 : 0;
}
