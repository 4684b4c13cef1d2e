/*
 * labweb: the lab's tiny application tier, built static and shipped in a
 * busybox image. One binary, three roles (LABWEB_ROLE). Every role listens on
 * 127.0.0.1:$LABWEB_PORT, answers one request per connection (HTTP/1.0,
 * Content-Length and Connection: close always sent), handles connections
 * sequentially, and runs periodic work on a 100 ms tick (main loop
 * poll(listen fd, 100 ms)).
 *
 * Build: gcc -static -O2 -Wall -pthread -o labweb labweb.c
 *        (glibc >= 2.34 also links without -pthread).
 *
 * ---------------------------------------------------------------- all roles
 *   LABWEB_ROLE        web (default) | upstream | worker
 *   LABWEB_PORT        port to listen on (127.0.0.1 only), default 18080
 *   LABWEB_VERSION     version string (/, /health, labweb_info); characters
 *                      other than [A-Za-z0-9._+-] are replaced by '_'
 *   LABWEB_STATUS_FILE node-exporter textfile written atomically (tmp+rename,
 *                      mode 0644) at every start, success or failure:
 *                        labweb_start_failed{reason="<reason>"} 1|0
 *                        labweb_start_timestamp_seconds <unix time>
 *                      reason: none (started), missing_setting, invalid_setting,
 *                      broken_release, dependency_down, port_in_use,
 *                      listen_failed. Give each role its own file (or set it
 *                      for web only): the textfile collector rejects the same
 *                      series in two files.
 *   LABWEB_REQUIRE     comma list of start dependencies that must answer:
 *                      redis (PING on LABWEB_REDIS), database (SSLRequest on
 *                      LABWEB_PG; "postgres" is an alias)
 *   LABWEB_CHAOS_TOKEN_FILE  file holding the bearer token of chaos endpoints
 *   LABWEB_ADMIN_TOKEN_FILE  file holding the bearer token of admin endpoints
 *                      (web). Both are read at every request, surrounding
 *                      whitespace stripped, compared in constant time, never
 *                      logged. Wrong/missing header -> 401 {"error":"unauthorized"};
 *                      variable unset, file unreadable or empty -> 403
 *                      {"error":"admin disabled"} / {"error":"chaos disabled"}.
 *
 * Start, in this order; each failure prints ONE line on stderr, writes the
 * status file with value 1 and the reason, and exits with code 1:
 *   1. required settings (web: LABWEB_UPSTREAM, LABWEB_PG, LABWEB_REDIS;
 *      worker: LABWEB_REDIS; upstream: none):
 *      "labweb: cannot start: required setting LABWEB_UPSTREAM is missing"
 *      (missing_setting). Bad LABWEB_ROLE / LABWEB_PORT / non-IPv4 host:port
 *      or unknown LABWEB_REQUIRE entry -> invalid_setting.
 *   2. LABWEB_BROKEN=1 (simulated broken release):
 *      "FATAL: required setting LABWEB_CONFIG is missing (broken release)"
 *      (broken_release)
 *   3. LABWEB_REQUIRE: "labweb: cannot start: dependency redis at
 *      127.0.0.1:PORT is not reachable (connection refused)" (dependency_down)
 *   4. bind: "labweb: cannot start: port 127.0.0.1:PORT is in use (bind:
 *      Address already in use)" (port_in_use; also when listen() meets
 *      EADDRINUSE: "(listen: ...)"); other socket/bind/listen errors ->
 *      "labweb: cannot start: cannot listen on 127.0.0.1:PORT (...)"
 *      (listen_failed)
 * SIGTERM/SIGINT exit 0 at once (the process is PID 1 in its container).
 *
 * Endpoints of every role: GET / (text, version and role), GET /health,
 * GET /metrics (Prometheus text 0.0.4; every role also exports
 * labweb_info{version,role} 1, process_resident_memory_bytes,
 * process_cpu_seconds_total (all threads), process_start_time_seconds).
 * Unknown path -> 404, wrong method -> 405 {"error":"method not allowed"}.
 *
 * ---------------------------------------------------------------- role web
 *   LABWEB_PG, LABWEB_REDIS    host:port of PostgreSQL / Redis (required)
 *   LABWEB_UPSTREAM            host:port of the prices API (required)
 *   LABWEB_UPSTREAM_TIMEOUT_MS total timeout of one upstream call, default 300
 *   LABWEB_BROKEN              "1": refuse to start (see above)
 *   LABWEB_LOG_FILE            app log (opened O_APPEND, created mode 0666 so
 *                              a rotation by another user can truncate it)
 *   LABWEB_MEMORY_LIMIT_BYTES  the container's memory limit (metric only)
 *   LABWEB_LEAK_CAP_BYTES      RSS at which the leak stops; default 85 % of
 *                              the limit, 64 MiB when no limit is set
 *   LABWEB_LEAK_BYTES_PER_S    leak rate, default 8 MiB
 *   LABWEB_QUEUE_KEY           Redis list the jobs go to, default "jobs"
 *   LABWEB_ERROR_PERCENT       0..100, share of /api/price answered 500
 *
 *   GET /health    PG (SSLRequest) + Redis (PING): 200 {"status":"ok",...}
 *                  or 503 {"status":"fail",...} naming the failing check.
 *   GET /api/price 1. with probability LABWEB_ERROR_PERCENT: 500 {"error":"internal"}
 *                  2. LPUSH <queue key> <job id> (failure counted, ignored)
 *                  3. degraded: 200 {"price":<cached|null>,"source":"cache"}
 *                  4. breaker open, 3 s cooldown not over: 503
 *                     {"error":"upstream circuit open"}; after it one trial
 *                     call (half-open): success closes, failure re-opens
 *                  5. GET /price on the upstream: 200 -> cache it, 200
 *                     {"price":..,"source":"upstream"}; else 502
 *                     {"error":"upstream <reason>"}, reason rate_limited (429,
 *                     Retry-After remembered), error (5xx, other codes, bad
 *                     body), timeout, refused (refused / reset / other).
 *                     5 consecutive failures open the breaker.
 *                  One app-log line per request.
 *   GET /metrics   labweb_info{version,role="web"} 1
 *                  labweb_http_requests_total{handler="price",code} (codes seen)
 *                  labweb_upstream_requests_total
 *                  labweb_upstream_failures_total{reason} (rate_limited, error,
 *                    timeout, refused: always all four)
 *                  labweb_upstream_retry_after_seconds (last seen, 0 if none)
 *                  labweb_circuit_breaker_open 0|1 (1 also while half-open)
 *                  labweb_degraded 0|1
 *                  labweb_queue_enqueued_total, labweb_queue_enqueue_failures_total
 *                  labweb_log_file_bytes (stat of LABWEB_LOG_FILE, 0 if none)
 *                  labweb_memory_limit_bytes (from env, 0 if unset)
 *                  process_* (see above)
 *   Admin (admin token):
 *     GET  /admin/status -> {"version":"1.1","degraded":false,"breaker":
 *          "closed"|"open"|"half_open","consecutive_failures":0,
 *          "retry_after_s":0,"cache_age_s":1.2|null}
 *          (half_open: open and the cooldown is over; the next call is the trial)
 *     POST /admin/degraded?on=1|0        -> the status JSON
 *     POST /admin/breaker?state=closed   -> closes, resets the failure count;
 *                                           the status JSON
 *   Chaos (chaos token), POST /admin/chaos?..., answers 200 {"ok":true}:
 *     leak=1|0      every tick malloc+memset a chunk: RSS grows at
 *                   LABWEB_LEAK_BYTES_PER_S up to LABWEB_LEAK_CAP_BYTES
 *     spin=1|0      a busy-looping pthread
 *     logburst=<n>  append ~n bytes (whole lines) of app-log lines at ~3 MB/s,
 *                   one chunk per tick
 *     off=1         stop leak, spin and burst (leaked memory stays)
 *   App log line: "seq=<n> ts=<unix> <text>\n", seq strictly increasing (it
 *   continues from the last line of an existing file); every write holds
 *   flock(fd, LOCK_EX), so a copytruncate rotation taking the same lock loses
 *   nothing. The file is never re-opened (copytruncate rotation expected).
 *
 * ------------------------------------------------------------ role upstream
 * "the prices API". Env: LABWEB_PORT, LABWEB_CHAOS_TOKEN_FILE.
 *   GET /price    by mode: ok 200 {"price":101.25}; slow: sleep 1000 ms, then
 *                 200; rate_limited 429 + "Retry-After: <n>" {"error":"rate limited"};
 *                 error 503 {"error":"unavailable"}
 *   GET /health   200 {"status":"ok","mode":"<mode>"}; in error 503
 *                 {"status":"down","mode":"error"}
 *   GET /metrics  labupstream_requests_total{code} (GET /price answers),
 *                 labupstream_mode{mode} 1 for the current mode, 0 for the others
 *   Chaos: POST /admin/mode?set=ok|slow|rate_limited|error&for=<s>&retry_after=<s>
 *                 for > 0: back to ok by itself after that many seconds (0 or
 *                 absent: until told); retry_after default 2.
 *                 -> 200 {"ok":true,"mode":..,"for_s":..,"retry_after_s":..}
 *
 * -------------------------------------------------------------- role worker
 * the queue consumer. Env: LABWEB_PORT, LABWEB_REDIS (required),
 * LABWEB_QUEUE_KEY (default "jobs"), LABWEB_CHAOS_TOKEN_FILE.
 *   Every tick: RPOP <key> 200 until the list is empty (at most ~80 ms per
 *   tick; falls back to pipelined plain RPOPs if the count form is refused);
 *   reconnects on error.
 *   GET /health   200 {"status":"ok","consuming":true|false} (also when stalled)
 *   GET /metrics  labworker_jobs_consumed_total,
 *                 labworker_last_consumed_timestamp_seconds (0 if never),
 *                 labworker_consuming 0|1
 *   Chaos: POST /admin/chaos?stall=1|0 (stall lasts until told or restart)
 *                 -> 200 {"ok":true}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define TICK_S 0.1
#define BREAKER_THRESHOLD 5
#define BREAKER_COOLDOWN_S 3.0
#define BURST_BYTES_PER_S 3000000.0
#define BURST_LINE_BYTES 160
#define BATCH 200
#define MIB (1024ULL * 1024ULL)

enum { ROLE_WEB, ROLE_UPSTREAM, ROLE_WORKER };
enum { NET_OK, NET_REFUSED, NET_TIMEOUT, NET_OTHER };

static int role;
static const char *role_name = "web";
static char version[64] = "unknown";
static double started_at;
static int listen_port = 18080;

/* ------------------------------------------------------------- utilities */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *env(const char *name) {
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* Non-negative integer from env; dflt when unset or not a number. */
static long long env_ll(const char *name, long long dflt) {
    const char *v = env(name);
    char *end;
    long long n;
    if (!v) return dflt;
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno || end == v || *end || n < 0) {
        printf("labweb: warning: %s=%s is not a non-negative integer, using %lld\n", name, v, dflt);
        return dflt;
    }
    return n;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static void appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
    va_list ap;
    int n;
    if (*len >= cap) return;
    va_start(ap, fmt);
    n = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (n > 0) *len = *len + (size_t)n >= cap ? cap - 1 : *len + (size_t)n;
}

/* xorshift64*, seeded from the clock and the pid */
static uint64_t rng_state;
static unsigned rand_percent(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (unsigned)(((rng_state * 2685821657736338717ULL) >> 33) % 100);
}

/* ----------------------------------------------------------- start status */

static void write_status(const char *reason, int failed) {
    const char *path = env("LABWEB_STATUS_FILE");
    char tmp[4200], body[640];
    int fd, n;
    if (!path) return;
    n = snprintf(body, sizeof body,
                 "# HELP labweb_start_failed 1 if the last start of the service failed, by reason\n"
                 "# TYPE labweb_start_failed gauge\n"
                 "labweb_start_failed{reason=\"%s\"} %d\n"
                 "# HELP labweb_start_timestamp_seconds When the service last tried to start\n"
                 "# TYPE labweb_start_timestamp_seconds gauge\n"
                 "labweb_start_timestamp_seconds %.3f\n",
                 reason, failed, wall());
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        printf("labweb: warning: cannot write status file %s (%s)\n", path, strerror(errno));
        return;
    }
    if (fchmod(fd, 0644) < 0) { /* best effort */ }
    if (write_all(fd, body, (size_t)n) < 0 || close(fd) < 0 || rename(tmp, path) < 0) {
        printf("labweb: warning: cannot write status file %s (%s)\n", path, strerror(errno));
        unlink(tmp);
    }
}

static void fail_start(const char *reason, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));
static void fail_start(const char *reason, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "labweb: cannot start: %s\n", line);
    write_status(reason, 1);
    exit(1);
}

/* ---------------------------------------------------------------- network */

static void set_timeouts(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int parse_addr(const char *hostport, struct sockaddr_in *sa) {
    char host[64];
    const char *colon;
    char *end;
    long port;
    if (!hostport) return -1;
    colon = strrchr(hostport, ':');
    if (!colon || colon == hostport || (size_t)(colon - hostport) >= sizeof host) return -1;
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = 0;
    port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || port < 1 || port > 65535) return -1;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((unsigned short)port);
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

/* Connect to host:port with a timeout; returns fd (blocking, with read/write
 * timeouts of timeout_ms) or -1 with *err and *kind set. */
static int dial(const char *hostport, int timeout_ms, const char **err, int *kind) {
    struct sockaddr_in sa;
    int fd, rc, soerr = 0, k = NET_OTHER;
    socklen_t len = sizeof soerr;
    struct pollfd pfd;

    if (!hostport) { *err = "not configured"; goto fail; }
    if (parse_addr(hostport, &sa) < 0) { *err = "bad address"; goto fail; }
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { *err = "socket error"; goto fail; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc < 0 && errno != EINPROGRESS) { soerr = errno; goto fail_fd; }
    if (rc < 0) {
        pfd.fd = fd;
        pfd.events = POLLOUT;
        do rc = poll(&pfd, 1, timeout_ms); while (rc < 0 && errno == EINTR);
        if (rc <= 0) { *err = "connect timeout"; k = NET_TIMEOUT; close(fd); goto fail; }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
        if (soerr) goto fail_fd;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    set_timeouts(fd, timeout_ms);
    if (kind) *kind = NET_OK;
    return fd;
fail_fd:
    close(fd);
    if (soerr == ECONNREFUSED) { *err = "connection refused"; k = NET_REFUSED; }
    else if (soerr == ETIMEDOUT) { *err = "connect timeout"; k = NET_TIMEOUT; }
    else *err = "connect failed";
fail:
    if (kind) *kind = k;
    return -1;
}

/* Send req, read up to n bytes into buf; returns bytes read or -1 with *err. */
static int exchange(const char *hostport, const void *req, size_t reqlen,
                    char *buf, size_t n, const char **err) {
    int fd = dial(hostport, 1000, err, NULL), got;
    if (fd < 0) return -1;
    if (write_all(fd, req, reqlen) < 0) { *err = "write failed"; close(fd); return -1; }
    got = (int)read(fd, buf, n);
    close(fd);
    if (got < 0) { *err = (errno == EAGAIN || errno == EWOULDBLOCK) ? "read timeout" : "read failed"; return -1; }
    if (got == 0) { *err = "connection closed"; return -1; }
    return got;
}

static const char *check_postgres(void) {
    static const unsigned char sslreq[8] = {0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f};
    char buf[8];
    const char *err = NULL;
    int got = exchange(getenv("LABWEB_PG"), sslreq, sizeof sslreq, buf, 1, &err);
    if (got < 0) return err;
    if (buf[0] == 'N' || buf[0] == 'S') return "ok";
    return "unexpected reply";
}

static const char *check_redis(void) {
    char buf[64];
    const char *err = NULL;
    int got = exchange(getenv("LABWEB_REDIS"), "PING\r\n", 6, buf, sizeof buf - 1, &err);
    if (got < 0) return err;
    buf[got] = 0;
    if (strncmp(buf, "+PONG", 5) == 0) return "ok";
    return "unexpected reply";
}

/* ------------------------------------------------------------ redis (RESP) */

struct rconn {
    int fd;
    size_t start, end;
    char buf[65536];
};

static void r_close(struct rconn *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->start = c->end = 0;
}

static int r_connect(struct rconn *c, const char *addr, int timeout_ms, const char **err) {
    r_close(c);
    c->fd = dial(addr, timeout_ms, err, NULL);
    return c->fd < 0 ? -1 : 0;
}

static int r_fill(struct rconn *c) {
    ssize_t n;
    if (c->start == c->end) c->start = c->end = 0;
    if (c->end == sizeof c->buf) {
        if (c->start == 0) return -1;
        memmove(c->buf, c->buf + c->start, c->end - c->start);
        c->end -= c->start;
        c->start = 0;
    }
    do n = read(c->fd, c->buf + c->end, sizeof c->buf - c->end); while (n < 0 && errno == EINTR);
    if (n <= 0) return -1;
    c->end += (size_t)n;
    return 0;
}

/* One reply line without CRLF into out (truncated to n-1). */
static int r_line(struct rconn *c, char *out, size_t n) {
    for (;;) {
        char *nl = memchr(c->buf + c->start, '\n', c->end - c->start);
        if (nl) {
            size_t len = (size_t)(nl - (c->buf + c->start));
            if (len && nl[-1] == '\r') len--;
            if (len >= n) len = n - 1;
            memcpy(out, c->buf + c->start, len);
            out[len] = 0;
            c->start = (size_t)(nl - c->buf) + 1;
            return 0;
        }
        if (r_fill(c) < 0) return -1;
    }
}

static int r_skip(struct rconn *c, size_t n) {
    while (n) {
        size_t take;
        if (c->start == c->end && r_fill(c) < 0) return -1;
        take = c->end - c->start < n ? c->end - c->start : n;
        c->start += take;
        n -= take;
    }
    return 0;
}

/* Skip one bulk reply whose header line is hdr; returns 1 (value), 0 (nil), -1. */
static int r_bulk(struct rconn *c, const char *hdr) {
    long len;
    if (hdr[0] != '$') return -1;
    len = atol(hdr + 1);
    if (len < 0) return 0;
    return r_skip(c, (size_t)len + 2) < 0 ? -1 : 1;
}

static size_t resp_cmd(char *out, size_t cap, int argc, const char **argv) {
    size_t len = 0;
    int i;
    appendf(out, cap, &len, "*%d\r\n", argc);
    for (i = 0; i < argc; i++) appendf(out, cap, &len, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
    return len;
}

/* ------------------------------------------------------------ http server */

struct req {
    char method[16], path[512], query[1024], auth[512];
    int head;
};

static const char *reason_phrase(int code) {
    switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}

static void respond_x(int fd, const struct req *r, int code, const char *ctype,
                      const char *extra, const char *body) {
    char head[768];
    size_t blen = strlen(body);
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                        "Connection: close\r\nServer: labweb/%s\r\n%s\r\n",
                        code, reason_phrase(code), ctype, blen, version, extra ? extra : "");
    if (write_all(fd, head, (size_t)hlen) < 0) return;
    if (r && r->head) return;
    write_all(fd, body, blen);
}

static void respond(int fd, const struct req *r, int code, const char *body) {
    respond_x(fd, r, code, "application/json", NULL, body);
}

static void respond_metrics(int fd, const struct req *r, const char *body) {
    respond_x(fd, r, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, body);
}

static void copy_trim(char *out, size_t n, const char *s, size_t len) {
    while (len && (*s == ' ' || *s == '\t')) { s++; len--; }
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r')) len--;
    if (len >= n) len = n - 1;
    memcpy(out, s, len);
    out[len] = 0;
}

/* Read the request head (and discard a body of up to 64 KiB); 0 ok, -1 bad. */
static int read_request(int fd, struct req *r) {
    char buf[8192], target[1536], *hend, *line, *next, *q, term = 0;
    size_t used = 0, hlen;
    ssize_t got;
    long clen = 0;

    memset(r, 0, sizeof *r);
    while (used < sizeof buf - 1) {
        got = read(fd, buf + used, sizeof buf - 1 - used);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        used += (size_t)got;
        buf[used] = 0;
        if (strstr(buf, "\r\n\r\n") || strstr(buf, "\n\n")) break;
    }
    buf[used] = 0;
    if (used == 0) return -1;
    hend = strstr(buf, "\r\n\r\n");
    hlen = hend ? (size_t)(hend - buf) + 4 : used;
    if (!hend && (hend = strstr(buf, "\n\n"))) hlen = (size_t)(hend - buf) + 2;

    line = buf;
    next = strpbrk(line, "\r\n");
    if (next) { term = *next; *next = 0; }
    if (sscanf(line, "%15s %1535s", r->method, target) != 2) return -1;
    q = strchr(target, '?');
    if (q) { *q = 0; copy_trim(r->query, sizeof r->query, q + 1, strlen(q + 1)); }
    copy_trim(r->path, sizeof r->path, target, strlen(target));
    r->head = strcmp(r->method, "HEAD") == 0;

    while (next && (size_t)(next - buf) < hlen) {
        line = next + 1;
        if (term == '\r' && *line == '\n') line++;
        if ((size_t)(line - buf) >= hlen || *line == '\r' || *line == '\n' || !*line) break;
        next = strpbrk(line, "\r\n");
        if (next) { term = *next; *next = 0; }
        if (strncasecmp(line, "Authorization:", 14) == 0)
            copy_trim(r->auth, sizeof r->auth, line + 14, strlen(line + 14));
        else if (strncasecmp(line, "Content-Length:", 15) == 0)
            clen = atol(line + 15);
    }
    if (clen > 0 && clen <= 65536) {
        long left = clen - (long)(used - hlen);
        char sink[4096];
        while (left > 0) {
            got = read(fd, sink, left < (long)sizeof sink ? (size_t)left : sizeof sink);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) break;
            left -= got;
        }
    }
    return 0;
}

static int qparam(const char *q, const char *name, char *out, size_t n) {
    size_t nl = strlen(name);
    const char *p = q;
    while (p && *p) {
        const char *amp = strchr(p, '&');
        size_t seg = amp ? (size_t)(amp - p) : strlen(p);
        if (seg >= nl && strncmp(p, name, nl) == 0 && (seg == nl || p[nl] == '=')) {
            const char *v = seg == nl ? p + nl : p + nl + 1;
            size_t vl = seg - (size_t)(v - p);
            if (vl >= n) vl = n - 1;
            memcpy(out, v, vl);
            out[vl] = 0;
            return 1;
        }
        p = amp ? amp + 1 : NULL;
    }
    return 0;
}

/* Parameter as a non-negative number; -1 if absent, -2 if not a number. */
static double qnum(const char *q, const char *name) {
    char v[64], *end;
    double d;
    if (!qparam(q, name, v, sizeof v)) return -1;
    d = strtod(v, &end);
    if (end == v || *end || d < 0 || d != d) return -2;
    return d;
}

static int read_token(const char *path, char *out, size_t n) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t got;
    size_t len;
    char *s;
    if (fd < 0) return -1;
    got = read(fd, out, n - 1);
    close(fd);
    if (got <= 0) return -1;
    out[got] = 0;
    s = out;
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
    len = strlen(s);
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r' || s[len - 1] == '\n')) len--;
    memmove(out, s, len);
    out[len] = 0;
    return (int)len;
}

/* Constant time in the length of the expected token. */
static int ct_equal(const char *given, size_t gl, const char *want, size_t wl) {
    unsigned char d = gl != wl;
    size_t i;
    for (i = 0; i < wl; i++) d |= (unsigned char)(want[i] ^ (i < gl ? given[i] : 0));
    return d == 0;
}

/* 1 if the request carries the token of $env_name; else answers 403/401. */
static int authorized(int fd, const struct req *r, const char *env_name, const char *what) {
    const char *path = env(env_name), *given = r->auth;
    char tok[512], body[64];
    int tl, ok;
    if (!path || (tl = read_token(path, tok, sizeof tok)) <= 0) {
        snprintf(body, sizeof body, "{\"error\":\"%s disabled\"}", what);
        respond(fd, r, 403, body);
        return 0;
    }
    if (strncasecmp(given, "Bearer ", 7) == 0) {
        given += 7;
        while (*given == ' ') given++;
    } else {
        given = "";
    }
    ok = ct_equal(given, strlen(given), tok, (size_t)tl);
    memset(tok, 0, sizeof tok);
    if (!ok) respond(fd, r, 401, "{\"error\":\"unauthorized\"}");
    return ok;
}

static int is_get(const struct req *r) {
    return strcmp(r->method, "GET") == 0 || r->head;
}

static int need_method(int fd, const struct req *r, const char *method) {
    if (strcmp(method, "GET") == 0 ? is_get(r) : strcmp(r->method, method) == 0) return 1;
    respond(fd, r, 405, "{\"error\":\"method not allowed\"}");
    return 0;
}

/* ------------------------------------------------------- process metrics */

static unsigned long long rss_bytes(void) {
    unsigned long long size = 0, res = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    if (fscanf(f, "%llu %llu", &size, &res) != 2) res = 0;
    fclose(f);
    return res * (unsigned long long)sysconf(_SC_PAGESIZE);
}

static double cpu_seconds(void) {
    char buf[1024], *p;
    unsigned long long ut = 0, st = 0;
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n;
    if (fd < 0) return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    p = strrchr(buf, ')');
    if (!p) return 0;
    /* after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void common_metrics(char *b, size_t cap, size_t *len) {
    appendf(b, cap, len,
            "# HELP labweb_info The running binary: version and role\n"
            "# TYPE labweb_info gauge\n"
            "labweb_info{version=\"%s\",role=\"%s\"} 1\n", version, role_name);
    appendf(b, cap, len,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
            "# TYPE process_resident_memory_bytes gauge\n"
            "process_resident_memory_bytes %llu\n"
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
            "# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total %.2f\n"
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
            "# TYPE process_start_time_seconds gauge\n"
            "process_start_time_seconds %.3f\n",
            rss_bytes(), cpu_seconds(), started_at);
}

/* ================================================================ role web */

static const char *upstream_addr, *queue_key = "jobs", *log_path;
static int upstream_timeout_ms = 300, error_percent;
static unsigned long long memory_limit, leak_cap, leak_rate = 8 * MIB;

static unsigned long long price_codes[600];
static unsigned long long upstream_requests, fail_counts[4], enqueued, enqueue_failures;
static const char *const fail_names[4] = {"rate_limited", "error", "timeout", "refused"};
static int retry_after_last, degraded, breaker_open, consecutive_failures;
static double breaker_opened_at, cached_price, cached_at;
static int have_cache;
static unsigned long long job_id;
static struct rconn *qconn;

static int log_fd = -1;
static unsigned long long log_seq;
static double log_retry_at;

static int leak_on;
static void *leak_head;
static unsigned long long leaked;
static int spin_wanted, spin_alive;
static long long burst_left;
static char *burst_buf;
#define BURST_BUF_BYTES (2 * 1024 * 1024)

/* seq of the last complete line of an existing log (0 if none) */
static unsigned long long last_seq_in(int fd) {
    char buf[8193], *p, *last = NULL;
    struct stat st;
    off_t off;
    ssize_t n;
    if (fstat(fd, &st) < 0 || st.st_size == 0) return 0;
    off = st.st_size > 8192 ? st.st_size - 8192 : 0;
    n = pread(fd, buf, sizeof buf - 1, off);
    if (n <= 0) return 0;
    buf[n] = 0;
    for (p = buf; (p = strstr(p, "seq=")); p += 4)
        if (p == buf || p[-1] == '\n') last = p;
    return last ? strtoull(last + 4, NULL, 10) : 0;
}

static void log_open(void) {
    int fd;
    if (!log_path || log_fd >= 0 || mono() < log_retry_at) return;
    fd = open(log_path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        printf("labweb: warning: cannot open log file %s (%s); retrying every second\n",
               log_path, strerror(errno));
        log_retry_at = mono() + 1;
        return;
    }
    flock(fd, LOCK_EX);
    if (!log_seq) log_seq = last_seq_in(fd);
    flock(fd, LOCK_UN);
    log_fd = fd;
}

static void log_write(const char *data, size_t n) {
    if (log_fd < 0) return;
    while (flock(log_fd, LOCK_EX) < 0 && errno == EINTR) {}
    if (write_all(log_fd, data, n) < 0) {
        printf("labweb: warning: writing %s failed (%s)\n", log_path, strerror(errno));
        close(log_fd);
        log_fd = -1;
        log_retry_at = mono() + 1;
        return;
    }
    flock(log_fd, LOCK_UN);
}

static void log_line(const char *text) {
    char line[768];
    int n;
    log_open();
    if (log_fd < 0) return;
    n = snprintf(line, sizeof line, "seq=%llu ts=%ld %s\n", ++log_seq, (long)time(NULL), text);
    if (n >= (int)sizeof line) { n = (int)sizeof line - 1; line[n - 1] = '\n'; }
    log_write(line, (size_t)n);
}

static void burst_tick(double dt) {
    size_t budget, used = 0;
    long now = (long)time(NULL);
    if (burst_left <= 0) return;
    log_open();
    if (log_fd < 0) return;
    if (!burst_buf && !(burst_buf = malloc(BURST_BUF_BYTES))) return;
    if (dt > 0.5) dt = 0.5;
    budget = (size_t)(BURST_BYTES_PER_S * dt);
    if (budget > (size_t)burst_left) budget = (size_t)burst_left;
    if (budget > BURST_BUF_BYTES - BURST_LINE_BYTES) budget = BURST_BUF_BYTES - BURST_LINE_BYTES;
    while (used < budget) {
        char *line = burst_buf + used;
        int n = snprintf(line, BURST_LINE_BYTES, "seq=%llu ts=%ld burst ", ++log_seq, now);
        if (n < BURST_LINE_BYTES - 1) {
            memset(line + n, 'x', (size_t)(BURST_LINE_BYTES - 1 - n));
            n = BURST_LINE_BYTES - 1;
        }
        line[n++] = '\n';
        used += (size_t)n;
    }
    log_write(burst_buf, used);
    burst_left -= (long long)used;
    if (burst_left <= 0) printf("chaos: log burst done\n");
}

static void leak_tick(double dt) {
    unsigned long long rss, chunk;
    void **p;
    if (!leak_on) return;
    if (dt > 1) dt = 1;
    rss = rss_bytes();
    if (rss >= leak_cap) return;
    chunk = (unsigned long long)((double)leak_rate * dt);
    if (chunk > leak_cap - rss) chunk = leak_cap - rss;
    if (chunk < 4096) return;
    p = malloc(chunk);
    if (!p) return;
    memset(p, 0xa5, chunk);
    *p = leak_head; /* keep it reachable: it is a leak, not garbage */
    leak_head = p;
    leaked += chunk;
}

static void *spin_main(void *arg) {
    volatile unsigned long x = 0;
    unsigned long i;
    (void)arg;
    while (__atomic_load_n(&spin_wanted, __ATOMIC_RELAXED))
        for (i = 0; i < 1000000; i++) x++;
    __atomic_store_n(&spin_alive, 0, __ATOMIC_RELEASE);
    return NULL;
}

static void spin_tick(void) {
    pthread_t t;
    pthread_attr_t attr;
    if (!__atomic_load_n(&spin_wanted, __ATOMIC_RELAXED) || __atomic_load_n(&spin_alive, __ATOMIC_ACQUIRE)) return;
    __atomic_store_n(&spin_alive, 1, __ATOMIC_RELEASE);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, spin_main, NULL) != 0) {
        printf("labweb: warning: pthread_create failed\n");
        __atomic_store_n(&spin_alive, 0, __ATOMIC_RELEASE);
    }
    pthread_attr_destroy(&attr);
}

static void web_tick(double dt) {
    leak_tick(dt);
    spin_tick();
    burst_tick(dt);
}

static int enqueue_job(void) {
    char cmd[512], line[128], id[32];
    const char *argv[3] = {"LPUSH", queue_key, id}, *err;
    size_t len;
    int attempt;
    snprintf(id, sizeof id, "%llu", ++job_id);
    len = resp_cmd(cmd, sizeof cmd, 3, argv);
    for (attempt = 0; attempt < 2; attempt++) {
        int fresh = qconn->fd < 0;
        if (fresh && r_connect(qconn, env("LABWEB_REDIS"), 200, &err) < 0) return -1;
        if (write_all(qconn->fd, cmd, len) == 0 && r_line(qconn, line, sizeof line) == 0)
            return line[0] == ':' ? 0 : -1;
        r_close(qconn);
        if (fresh) return -1; /* a new connection failed: no point retrying */
    }
    return -1;
}

static const char *breaker_state(void) {
    if (!breaker_open) return "closed";
    return mono() - breaker_opened_at >= BREAKER_COOLDOWN_S ? "half_open" : "open";
}

static char *find_header(char *head, const char *name) {
    size_t nl = strlen(name);
    char *p = strstr(head, "\n");
    while (p) {
        p++;
        if (*p == '\r' || *p == '\n' || !*p) return NULL;
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') return p + nl + 1;
        p = strchr(p, '\n');
    }
    return NULL;
}

/* GET /price on the upstream; NULL on success (price set), else the reason. */
static const char *call_upstream(double *price) {
    char buf[4096], req[256], *body, *h, *pp, *end;
    double deadline = mono() + upstream_timeout_ms / 1000.0;
    const char *err;
    int kind, fd, code, n;
    size_t used = 0;

    fd = dial(upstream_addr, upstream_timeout_ms, &err, &kind);
    if (fd < 0) return kind == NET_TIMEOUT ? "timeout" : "refused";
    n = snprintf(req, sizeof req, "GET /price HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n", upstream_addr);
    if (write_all(fd, req, (size_t)n) < 0) {
        int e = errno;
        close(fd);
        return e == EAGAIN || e == EWOULDBLOCK ? "timeout" : "refused";
    }
    for (;;) {
        struct pollfd pfd = {fd, POLLIN, 0};
        int left = (int)((deadline - mono()) * 1000), rc;
        ssize_t got;
        if (left <= 0) { close(fd); return "timeout"; }
        rc = poll(&pfd, 1, left);
        if (rc < 0 && errno == EINTR) continue;
        if (rc == 0) { close(fd); return "timeout"; }
        got = read(fd, buf + used, sizeof buf - 1 - used);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) { int e = errno; close(fd); return e == EAGAIN ? "timeout" : "refused"; }
        if (got == 0) break;
        used += (size_t)got;
        if (used == sizeof buf - 1) break;
    }
    close(fd);
    buf[used] = 0;
    if (used < 12 || strncmp(buf, "HTTP/1.", 7) != 0) return used ? "error" : "refused";
    code = atoi(buf + 9);
    body = strstr(buf, "\r\n\r\n");
    if (body) { *body = 0; body += 4; }
    if (code == 429) {
        h = find_header(buf, "Retry-After");
        retry_after_last = h ? atoi(h) : 0;
        if (retry_after_last < 0) retry_after_last = 0;
        return "rate_limited";
    }
    if (code != 200 || !body) return "error";
    pp = strstr(body, "\"price\"");
    if (!pp || !(pp = strchr(pp + 7, ':'))) return "error";
    *price = strtod(pp + 1, &end);
    if (end == pp + 1) return "error";
    return NULL;
}

static void handle_price(int fd, const struct req *r) {
    char body[256], text[320];
    const char *reason = NULL, *source = "-";
    int code;
    double price = 0;

    if (!is_get(r)) {
        code = 405;
        snprintf(body, sizeof body, "{\"error\":\"method not allowed\"}");
    } else if (error_percent > 0 && (int)rand_percent() < error_percent) {
        code = 500;
        snprintf(body, sizeof body, "{\"error\":\"internal\"}");
    } else {
        if (enqueue_job() == 0) enqueued++;
        else enqueue_failures++;
        if (degraded) {
            code = 200;
            source = "cache";
            if (have_cache) snprintf(body, sizeof body, "{\"price\":%.15g,\"source\":\"cache\"}", cached_price);
            else snprintf(body, sizeof body, "{\"price\":null,\"source\":\"cache\"}");
        } else if (breaker_open && mono() - breaker_opened_at < BREAKER_COOLDOWN_S) {
            code = 503;
            source = "breaker";
            snprintf(body, sizeof body, "{\"error\":\"upstream circuit open\"}");
        } else {
            int trial = breaker_open, i;
            upstream_requests++;
            reason = call_upstream(&price);
            if (!reason) {
                code = 200;
                source = "upstream";
                cached_price = price;
                cached_at = mono();
                have_cache = 1;
                consecutive_failures = 0;
                if (breaker_open) printf("breaker: closed (trial call succeeded)\n");
                breaker_open = 0;
                snprintf(body, sizeof body, "{\"price\":%.15g,\"source\":\"upstream\"}", price);
            } else {
                code = 502;
                source = "upstream";
                for (i = 0; i < 4; i++)
                    if (strcmp(reason, fail_names[i]) == 0) fail_counts[i]++;
                consecutive_failures++;
                if (trial || (!breaker_open && consecutive_failures >= BREAKER_THRESHOLD)) {
                    printf("breaker: open (%s, %d consecutive upstream failures, last: %s)\n",
                           trial ? "trial call failed" : "threshold reached", consecutive_failures, reason);
                    breaker_open = 1;
                    breaker_opened_at = mono();
                }
                snprintf(body, sizeof body, "{\"error\":\"upstream %s\"}", reason);
            }
        }
    }
    price_codes[code]++;
    snprintf(text, sizeof text, "%s /api/price %d source=%s%s%s", r->method, code, source,
             reason ? " upstream_failure=" : "", reason ? reason : "");
    log_line(text);
    respond(fd, r, code, body);
}

static void status_json(char *b, size_t n) {
    char age[32];
    if (have_cache) snprintf(age, sizeof age, "%.1f", mono() - cached_at);
    else snprintf(age, sizeof age, "null");
    snprintf(b, n,
             "{\"version\":\"%s\",\"degraded\":%s,\"breaker\":\"%s\",\"consecutive_failures\":%d,"
             "\"retry_after_s\":%d,\"cache_age_s\":%s}",
             version, degraded ? "true" : "false", breaker_state(), consecutive_failures,
             retry_after_last, age);
}

static void web_metrics(int fd, const struct req *r) {
    static char b[16384];
    size_t len = 0;
    struct stat st;
    int i;
    common_metrics(b, sizeof b, &len);
    appendf(b, sizeof b, &len,
            "# HELP labweb_http_requests_total Requests to /api/price by status code\n"
            "# TYPE labweb_http_requests_total counter\n");
    for (i = 0; i < 600; i++)
        if (price_codes[i])
            appendf(b, sizeof b, &len, "labweb_http_requests_total{handler=\"price\",code=\"%d\"} %llu\n",
                    i, price_codes[i]);
    appendf(b, sizeof b, &len,
            "# HELP labweb_upstream_requests_total Calls to the upstream prices API\n"
            "# TYPE labweb_upstream_requests_total counter\n"
            "labweb_upstream_requests_total %llu\n"
            "# HELP labweb_upstream_failures_total Failed upstream calls by reason\n"
            "# TYPE labweb_upstream_failures_total counter\n", upstream_requests);
    for (i = 0; i < 4; i++)
        appendf(b, sizeof b, &len, "labweb_upstream_failures_total{reason=\"%s\"} %llu\n",
                fail_names[i], fail_counts[i]);
    appendf(b, sizeof b, &len,
            "# HELP labweb_upstream_retry_after_seconds Last Retry-After the upstream sent (0 if none)\n"
            "# TYPE labweb_upstream_retry_after_seconds gauge\n"
            "labweb_upstream_retry_after_seconds %d\n"
            "# HELP labweb_circuit_breaker_open 1 if the upstream circuit breaker is open\n"
            "# TYPE labweb_circuit_breaker_open gauge\n"
            "labweb_circuit_breaker_open %d\n"
            "# HELP labweb_degraded 1 if degraded mode (serve cached prices) is on\n"
            "# TYPE labweb_degraded gauge\n"
            "labweb_degraded %d\n"
            "# HELP labweb_queue_enqueued_total Jobs pushed to the queue\n"
            "# TYPE labweb_queue_enqueued_total counter\n"
            "labweb_queue_enqueued_total %llu\n"
            "# HELP labweb_queue_enqueue_failures_total Jobs that could not be pushed to the queue\n"
            "# TYPE labweb_queue_enqueue_failures_total counter\n"
            "labweb_queue_enqueue_failures_total %llu\n"
            "# HELP labweb_log_file_bytes Size of the app log file\n"
            "# TYPE labweb_log_file_bytes gauge\n"
            "labweb_log_file_bytes %lld\n"
            "# HELP labweb_memory_limit_bytes Memory limit of the container (0 if unknown)\n"
            "# TYPE labweb_memory_limit_bytes gauge\n"
            "labweb_memory_limit_bytes %llu\n",
            retry_after_last, breaker_open, degraded, enqueued, enqueue_failures,
            log_path && stat(log_path, &st) == 0 ? (long long)st.st_size : 0LL, memory_limit);
    respond_metrics(fd, r, b);
}

static void web_chaos(int fd, const struct req *r) {
    char v[32];
    double n;
    int any = 0;
    if (qparam(r->query, "off", v, sizeof v) && strcmp(v, "1") == 0) {
        leak_on = 0;
        __atomic_store_n(&spin_wanted, 0, __ATOMIC_RELAXED);
        burst_left = 0;
        printf("chaos: off (leaked %llu bytes stay)\n", leaked);
        any = 1;
    }
    if (qparam(r->query, "leak", v, sizeof v)) {
        if (strcmp(v, "1") && strcmp(v, "0")) goto bad;
        leak_on = v[0] == '1';
        printf("chaos: leak %s (%llu bytes/s up to %llu bytes RSS)\n", leak_on ? "on" : "off", leak_rate, leak_cap);
        any = 1;
    }
    if (qparam(r->query, "spin", v, sizeof v)) {
        if (strcmp(v, "1") && strcmp(v, "0")) goto bad;
        __atomic_store_n(&spin_wanted, v[0] == '1', __ATOMIC_RELAXED);
        spin_tick();
        printf("chaos: spin %s\n", v[0] == '1' ? "on" : "off");
        any = 1;
    }
    if ((n = qnum(r->query, "logburst")) != -1) {
        if (n < 0) goto bad;
        burst_left += (long long)n;
        printf("chaos: log burst of %.0f bytes%s\n", n, log_path ? "" : " (no LABWEB_LOG_FILE: ignored)");
        if (!log_path) burst_left = 0;
        any = 1;
    }
    if (!any) goto bad;
    respond(fd, r, 200, "{\"ok\":true}");
    return;
bad:
    respond(fd, r, 400, "{\"error\":\"expected leak=1|0, spin=1|0, logburst=<bytes> or off=1\"}");
}

static void web_handle(int fd, const struct req *r) {
    char body[1024], v[32];
    if (strcmp(r->path, "/api/price") == 0) {
        handle_price(fd, r);
    } else if (strcmp(r->path, "/health") == 0) {
        const char *pg, *rd;
        int ok;
        if (!need_method(fd, r, "GET")) return;
        pg = check_postgres();
        rd = check_redis();
        ok = strcmp(pg, "ok") == 0 && strcmp(rd, "ok") == 0;
        snprintf(body, sizeof body,
                 "{\"status\":\"%s\",\"version\":\"%s\",\"checks\":{\"postgres\":\"%s\",\"redis\":\"%s\"}}",
                 ok ? "ok" : "fail", version, pg, rd);
        if (!ok) printf("health: fail postgres=%s redis=%s\n", pg, rd);
        respond(fd, r, ok ? 200 : 503, body);
    } else if (strcmp(r->path, "/metrics") == 0) {
        if (need_method(fd, r, "GET")) web_metrics(fd, r);
    } else if (strcmp(r->path, "/admin/status") == 0) {
        if (!authorized(fd, r, "LABWEB_ADMIN_TOKEN_FILE", "admin") || !need_method(fd, r, "GET")) return;
        status_json(body, sizeof body);
        respond(fd, r, 200, body);
    } else if (strcmp(r->path, "/admin/degraded") == 0) {
        if (!authorized(fd, r, "LABWEB_ADMIN_TOKEN_FILE", "admin") || !need_method(fd, r, "POST")) return;
        if (!qparam(r->query, "on", v, sizeof v) || (strcmp(v, "1") && strcmp(v, "0"))) {
            respond(fd, r, 400, "{\"error\":\"expected on=1 or on=0\"}");
            return;
        }
        if (degraded != (v[0] == '1')) printf("admin: degraded mode %s\n", v[0] == '1' ? "on" : "off");
        degraded = v[0] == '1';
        status_json(body, sizeof body);
        respond(fd, r, 200, body);
    } else if (strcmp(r->path, "/admin/breaker") == 0) {
        if (!authorized(fd, r, "LABWEB_ADMIN_TOKEN_FILE", "admin") || !need_method(fd, r, "POST")) return;
        if (!qparam(r->query, "state", v, sizeof v) || strcmp(v, "closed")) {
            respond(fd, r, 400, "{\"error\":\"expected state=closed\"}");
            return;
        }
        printf("admin: breaker closed (was %s, %d consecutive failures)\n", breaker_state(), consecutive_failures);
        breaker_open = 0;
        consecutive_failures = 0;
        status_json(body, sizeof body);
        respond(fd, r, 200, body);
    } else if (strcmp(r->path, "/admin/chaos") == 0) {
        if (authorized(fd, r, "LABWEB_CHAOS_TOKEN_FILE", "chaos") && need_method(fd, r, "POST")) web_chaos(fd, r);
    } else if (strcmp(r->path, "/") == 0) {
        if (!need_method(fd, r, "GET")) return;
        snprintf(body, sizeof body, "labweb %s\n", version);
        respond_x(fd, r, 200, "text/plain", NULL, body);
    } else {
        respond_x(fd, r, 404, "text/plain", NULL, "not found\n");
    }
}

static void web_init(void) {
    static struct rconn conn;
    upstream_addr = env("LABWEB_UPSTREAM");
    upstream_timeout_ms = (int)env_ll("LABWEB_UPSTREAM_TIMEOUT_MS", 300);
    if (upstream_timeout_ms < 1) upstream_timeout_ms = 1;
    error_percent = (int)env_ll("LABWEB_ERROR_PERCENT", 0);
    if (error_percent > 100) error_percent = 100;
    memory_limit = (unsigned long long)env_ll("LABWEB_MEMORY_LIMIT_BYTES", 0);
    leak_cap = (unsigned long long)env_ll("LABWEB_LEAK_CAP_BYTES",
                                          memory_limit ? (long long)(memory_limit * 85 / 100) : (long long)(64 * MIB));
    leak_rate = (unsigned long long)env_ll("LABWEB_LEAK_BYTES_PER_S", (long long)(8 * MIB));
    if (env("LABWEB_QUEUE_KEY")) queue_key = env("LABWEB_QUEUE_KEY");
    log_path = env("LABWEB_LOG_FILE");
    conn.fd = -1;
    qconn = &conn;
    log_open();
}

/* =========================================================== role upstream */

enum { M_OK, M_SLOW, M_RATE, M_ERROR };
static const char *const mode_names[4] = {"ok", "slow", "rate_limited", "error"};
static int up_mode, up_retry_after = 2;
static double up_mode_until;
static unsigned long long up_codes[600];

static void upstream_tick(double dt) {
    (void)dt;
    if (up_mode_until > 0 && mono() >= up_mode_until) {
        printf("mode: %s is over, back to ok\n", mode_names[up_mode]);
        up_mode = M_OK;
        up_mode_until = 0;
    }
}

static void upstream_handle(int fd, const struct req *r) {
    char body[512], extra[64];
    size_t len = 0;
    int i;
    upstream_tick(0);
    if (strcmp(r->path, "/price") == 0) {
        int code = 200;
        if (!need_method(fd, r, "GET")) return;
        switch (up_mode) {
        case M_SLOW:
            usleep(1000 * 1000);
            /* fall through */
        case M_OK:
            respond(fd, r, 200, "{\"price\":101.25}");
            break;
        case M_RATE:
            code = 429;
            snprintf(extra, sizeof extra, "Retry-After: %d\r\n", up_retry_after);
            respond_x(fd, r, 429, "application/json", extra, "{\"error\":\"rate limited\"}");
            break;
        default:
            code = 503;
            respond(fd, r, 503, "{\"error\":\"unavailable\"}");
        }
        up_codes[code]++;
    } else if (strcmp(r->path, "/health") == 0) {
        if (!need_method(fd, r, "GET")) return;
        if (up_mode == M_ERROR) {
            respond(fd, r, 503, "{\"status\":\"down\",\"mode\":\"error\"}");
        } else {
            snprintf(body, sizeof body, "{\"status\":\"ok\",\"mode\":\"%s\"}", mode_names[up_mode]);
            respond(fd, r, 200, body);
        }
    } else if (strcmp(r->path, "/metrics") == 0) {
        static char b[8192];
        if (!need_method(fd, r, "GET")) return;
        common_metrics(b, sizeof b, &len);
        appendf(b, sizeof b, &len,
                "# HELP labupstream_requests_total GET /price answers by status code\n"
                "# TYPE labupstream_requests_total counter\n");
        for (i = 0; i < 600; i++)
            if (up_codes[i]) appendf(b, sizeof b, &len, "labupstream_requests_total{code=\"%d\"} %llu\n", i, up_codes[i]);
        appendf(b, sizeof b, &len,
                "# HELP labupstream_mode 1 for the current mode of the prices API\n"
                "# TYPE labupstream_mode gauge\n");
        for (i = 0; i < 4; i++)
            appendf(b, sizeof b, &len, "labupstream_mode{mode=\"%s\"} %d\n", mode_names[i], i == up_mode);
        respond_metrics(fd, r, b);
    } else if (strcmp(r->path, "/admin/mode") == 0) {
        char set[32];
        double f, ra;
        int m = -1;
        if (!authorized(fd, r, "LABWEB_CHAOS_TOKEN_FILE", "chaos") || !need_method(fd, r, "POST")) return;
        if (qparam(r->query, "set", set, sizeof set))
            for (i = 0; i < 4; i++)
                if (strcmp(set, mode_names[i]) == 0) m = i;
        f = qnum(r->query, "for");
        ra = qnum(r->query, "retry_after");
        if (m < 0 || f == -2 || ra == -2) {
            respond(fd, r, 400, "{\"error\":\"expected set=ok|slow|rate_limited|error, for=<s>, retry_after=<s>\"}");
            return;
        }
        if (f < 0) f = 0;
        up_mode = m;
        up_mode_until = f > 0 ? mono() + f : 0;
        up_retry_after = ra < 0 ? 2 : (int)ra;
        printf("mode: %s for %s%.0fs, retry_after %ds\n", mode_names[m], f > 0 ? "" : "ever (", f, up_retry_after);
        snprintf(body, sizeof body, "{\"ok\":true,\"mode\":\"%s\",\"for_s\":%.15g,\"retry_after_s\":%d}",
                 mode_names[m], f, up_retry_after);
        respond(fd, r, 200, body);
    } else if (strcmp(r->path, "/") == 0) {
        if (!need_method(fd, r, "GET")) return;
        snprintf(body, sizeof body, "labweb %s (upstream)\n", version);
        respond_x(fd, r, 200, "text/plain", NULL, body);
    } else {
        respond_x(fd, r, 404, "text/plain", NULL, "not found\n");
    }
}

/* ============================================================= role worker */

static struct rconn wconn = {.fd = -1};
static int w_stalled, w_no_count;
static unsigned long long w_consumed;
static double w_last_consumed, w_retry_at;

/* Pop up to BATCH jobs; returns how many, -1 on a connection error. */
static int pop_batch(void) {
    static char cmd[32768];
    char line[256], count[16];
    const char *argv[3] = {"RPOP", queue_key, count};
    size_t len = 0;
    long n, i;
    int got = 0, rc;

    if (!w_no_count) {
        snprintf(count, sizeof count, "%d", BATCH);
        len = resp_cmd(cmd, sizeof cmd, 3, argv);
        if (write_all(wconn.fd, cmd, len) < 0 || r_line(&wconn, line, sizeof line) < 0) return -1;
        if (line[0] == '*') {
            n = atol(line + 1);
            for (i = 0; i < n; i++) {
                if (r_line(&wconn, line, sizeof line) < 0 || (rc = r_bulk(&wconn, line)) < 0) return -1;
                got += rc;
            }
            return got;
        }
        if (line[0] == '$') return r_bulk(&wconn, line);
        if (line[0] != '-' || !strstr(line, "wrong number of arguments")) {
            printf("worker: unexpected reply to RPOP: %.80s\n", line);
            return -1;
        }
        printf("worker: RPOP with a count is not supported here, popping one at a time\n");
        w_no_count = 1;
        len = 0;
    }
    for (i = 0; i < BATCH; i++) len += resp_cmd(cmd + len, sizeof cmd - len, 2, argv);
    if (write_all(wconn.fd, cmd, len) < 0) return -1;
    for (i = 0; i < BATCH; i++) {
        if (r_line(&wconn, line, sizeof line) < 0 || (rc = r_bulk(&wconn, line)) < 0) return -1;
        got += rc;
    }
    return got;
}

static void worker_tick(double dt) {
    double deadline = mono() + 0.08;
    const char *err;
    int n;
    (void)dt;
    if (w_stalled) return;
    if (wconn.fd < 0) {
        if (mono() < w_retry_at) return;
        if (r_connect(&wconn, env("LABWEB_REDIS"), 200, &err) < 0) {
            printf("worker: redis %s: %s (retrying)\n", env("LABWEB_REDIS"), err);
            w_retry_at = mono() + 1;
            return;
        }
    }
    do {
        n = pop_batch();
        if (n < 0) {
            printf("worker: redis connection lost, reconnecting\n");
            r_close(&wconn);
            return;
        }
        if (n > 0) {
            w_consumed += (unsigned long long)n;
            w_last_consumed = wall();
        }
    } while (n == BATCH && mono() < deadline);
}

static void worker_handle(int fd, const struct req *r) {
    static char b[8192];
    char body[256], v[16];
    size_t len = 0;
    if (strcmp(r->path, "/health") == 0) {
        if (!need_method(fd, r, "GET")) return;
        snprintf(body, sizeof body, "{\"status\":\"ok\",\"consuming\":%s}", w_stalled ? "false" : "true");
        respond(fd, r, 200, body);
    } else if (strcmp(r->path, "/metrics") == 0) {
        if (!need_method(fd, r, "GET")) return;
        common_metrics(b, sizeof b, &len);
        appendf(b, sizeof b, &len,
                "# HELP labworker_jobs_consumed_total Jobs popped from the queue\n"
                "# TYPE labworker_jobs_consumed_total counter\n"
                "labworker_jobs_consumed_total %llu\n"
                "# HELP labworker_last_consumed_timestamp_seconds When a job was last popped (0 if never)\n"
                "# TYPE labworker_last_consumed_timestamp_seconds gauge\n"
                "labworker_last_consumed_timestamp_seconds %.3f\n"
                "# HELP labworker_consuming 1 if the consumer loop is running (not stalled)\n"
                "# TYPE labworker_consuming gauge\n"
                "labworker_consuming %d\n",
                w_consumed, w_last_consumed, !w_stalled);
        respond_metrics(fd, r, b);
    } else if (strcmp(r->path, "/admin/chaos") == 0) {
        if (!authorized(fd, r, "LABWEB_CHAOS_TOKEN_FILE", "chaos") || !need_method(fd, r, "POST")) return;
        if (!qparam(r->query, "stall", v, sizeof v) || (strcmp(v, "1") && strcmp(v, "0"))) {
            respond(fd, r, 400, "{\"error\":\"expected stall=1 or stall=0\"}");
            return;
        }
        w_stalled = v[0] == '1';
        printf("chaos: consumer %s\n", w_stalled ? "stalled" : "resumed");
        respond(fd, r, 200, "{\"ok\":true}");
    } else if (strcmp(r->path, "/") == 0) {
        if (!need_method(fd, r, "GET")) return;
        snprintf(body, sizeof body, "labweb %s (worker)\n", version);
        respond_x(fd, r, 200, "text/plain", NULL, body);
    } else {
        respond_x(fd, r, 404, "text/plain", NULL, "not found\n");
    }
}

/* ================================================================== main */

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static void serve_one(int fd) {
    struct req r;
    set_timeouts(fd, 2000);
    if (read_request(fd, &r) < 0) {
        respond_x(fd, NULL, 400, "text/plain", NULL, "bad request\n");
        return;
    }
    if (strcmp(r.path, "/metrics") && strcmp(r.path, "/api/price") && strcmp(r.path, "/price"))
        printf("request: %s %s%s%s\n", r.method, r.path, r.query[0] ? "?" : "", r.query);
    if (role == ROLE_WEB) web_handle(fd, &r);
    else if (role == ROLE_UPSTREAM) upstream_handle(fd, &r);
    else worker_handle(fd, &r);
    shutdown(fd, SHUT_WR);
}

static void require_setting(const char *name) {
    const char *v = env(name);
    struct sockaddr_in sa;
    if (!v) fail_start("missing_setting", "required setting %s is missing", name);
    if (parse_addr(v, &sa) < 0)
        fail_start("invalid_setting", "setting %s=%.200s is not an IPv4 host:port", name, v);
}

static void check_dependencies(void) {
    const char *req = env("LABWEB_REQUIRE"), *p, *res;
    char name[64];
    while (req && *req) {
        size_t n = strcspn(req, ",");
        copy_trim(name, sizeof name, req, n);
        req += n + (req[n] == ',');
        if (!name[0]) continue;
        if (strcmp(name, "redis") == 0) {
            require_setting("LABWEB_REDIS");
            p = env("LABWEB_REDIS");
            res = check_redis();
        } else if (strcmp(name, "database") == 0 || strcmp(name, "postgres") == 0) {
            require_setting("LABWEB_PG");
            p = env("LABWEB_PG");
            res = check_postgres();
        } else {
            fail_start("invalid_setting", "LABWEB_REQUIRE names unknown dependency %.60s (known: redis, database)", name);
        }
        if (strcmp(res, "ok"))
            fail_start("dependency_down", "dependency %s at %s is not reachable (%s)", name, p, res);
    }
}

int main(void) {
    const char *v = env("LABWEB_VERSION"), *rn = env("LABWEB_ROLE"), *b = getenv("LABWEB_BROKEN"), *ps;
    struct sockaddr_in sa;
    int one = 1, lfd, i;
    char *end;
    long port;
    double last;

    setvbuf(stdout, NULL, _IONBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    umask(0);
    started_at = wall();
    rng_state = ((uint64_t)(started_at * 1e6) ^ ((uint64_t)getpid() << 32)) | 1;
    if (v) {
        snprintf(version, sizeof version, "%s", v);
        for (i = 0; version[i]; i++)
            if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-", version[i]))
                version[i] = '_';
    }

    /* 1. settings */
    if (!rn || strcmp(rn, "web") == 0) role = ROLE_WEB, role_name = "web";
    else if (strcmp(rn, "upstream") == 0) role = ROLE_UPSTREAM, role_name = "upstream";
    else if (strcmp(rn, "worker") == 0) role = ROLE_WORKER, role_name = "worker";
    else fail_start("invalid_setting", "LABWEB_ROLE=%.60s is not web, upstream or worker", rn);
    if ((ps = env("LABWEB_PORT"))) {
        port = strtol(ps, &end, 10);
        if (end == ps || *end || port < 1 || port > 65535)
            fail_start("invalid_setting", "LABWEB_PORT=%.60s is not a port number", ps);
        listen_port = (int)port;
    }
    if (role == ROLE_WEB) {
        require_setting("LABWEB_UPSTREAM");
        require_setting("LABWEB_PG");
        require_setting("LABWEB_REDIS");
    } else if (role == ROLE_WORKER) {
        require_setting("LABWEB_REDIS");
    }
    if (env("LABWEB_QUEUE_KEY") && (strlen(env("LABWEB_QUEUE_KEY")) > 200 || strpbrk(env("LABWEB_QUEUE_KEY"), "\r\n")))
        fail_start("invalid_setting", "LABWEB_QUEUE_KEY must be at most 200 characters on one line");
    if (env("LABWEB_QUEUE_KEY")) queue_key = env("LABWEB_QUEUE_KEY");

    /* 2. broken release */
    if (b && strcmp(b, "1") == 0) {
        fprintf(stderr, "FATAL: required setting LABWEB_CONFIG is missing (broken release)\n");
        write_status("broken_release", 1);
        return 1;
    }

    /* 3. dependencies */
    check_dependencies();

    /* 4. bind */
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) fail_start("listen_failed", "cannot listen on 127.0.0.1:%d (socket: %s)", listen_port, strerror(errno));
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)listen_port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (errno == EADDRINUSE)
            fail_start("port_in_use", "port 127.0.0.1:%d is in use (bind: %s)", listen_port, strerror(errno));
        fail_start("listen_failed", "cannot listen on 127.0.0.1:%d (bind: %s)", listen_port, strerror(errno));
    }
    if (listen(lfd, 128) < 0) {
        if (errno == EADDRINUSE) /* another socket bound with SO_REUSEADDR, listening first */
            fail_start("port_in_use", "port 127.0.0.1:%d is in use (listen: %s)", listen_port, strerror(errno));
        fail_start("listen_failed", "cannot listen on 127.0.0.1:%d (listen: %s)", listen_port, strerror(errno));
    }
    write_status("none", 0);

    if (role == ROLE_WEB) web_init();
    printf("labweb %s (%s) listening on 127.0.0.1:%d\n", version, role_name, listen_port);

    last = mono();
    for (;;) {
        struct pollfd pfd = {lfd, POLLIN, 0};
        double now = mono();
        int wait = (int)((last + TICK_S - now) * 1000), rc;
        if (wait < 0) wait = 0;
        if (wait > 100) wait = 100;
        rc = poll(&pfd, 1, wait);
        if (rc > 0 && (pfd.revents & POLLIN)) {
            int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (cfd >= 0) {
                serve_one(cfd);
                close(cfd);
            } else if (errno != EINTR && errno != EAGAIN) {
                printf("labweb: accept: %s\n", strerror(errno));
            }
        }
        now = mono();
        if (now - last >= TICK_S) {
            if (role == ROLE_WEB) web_tick(now - last);
            else if (role == ROLE_UPSTREAM) upstream_tick(now - last);
            else worker_tick(now - last);
            last = now;
        }
    }
}
