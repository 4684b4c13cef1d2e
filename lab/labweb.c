/*
 * labweb: the lab's tiny "web" service, built static and shipped in a
 * busybox image. One request per connection, handled sequentially.
 *
 *   LABWEB_PORT   port to listen on (127.0.0.1 only), default 18080
 *   LABWEB_PG     host:port of PostgreSQL (checked with an SSLRequest)
 *   LABWEB_REDIS  host:port of Redis (checked with PING)
 *   LABWEB_VERSION version string reported by / and /health
 *   LABWEB_BROKEN if "1": refuse to start (simulated broken release)
 *
 * GET /health -> 200 {"status":"ok",...} or 503 naming the failing checks.
 * GET /       -> 200 with the version. Anything else -> 404.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static const char *version = "unknown";

static void set_timeouts(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Connect to host:port with a timeout; returns fd or -1 with *err set. */
static int dial(const char *hostport, int timeout_ms, const char **err) {
    char host[128];
    const char *colon;
    struct sockaddr_in sa;
    int fd, rc, soerr = 0;
    socklen_t len = sizeof soerr;
    struct pollfd pfd;

    if (!hostport || !*hostport) { *err = "not configured"; return -1; }
    colon = strrchr(hostport, ':');
    if (!colon || (size_t)(colon - hostport) >= sizeof host) { *err = "bad address"; return -1; }
    memcpy(host, hostport, colon - hostport);
    host[colon - hostport] = 0;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { *err = "bad address"; return -1; }

    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) { *err = "socket error"; return -1; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc < 0 && errno != EINPROGRESS) {
        *err = errno == ECONNREFUSED ? "connection refused" : "connect failed";
        close(fd);
        return -1;
    }
    if (rc < 0) {
        pfd.fd = fd;
        pfd.events = POLLOUT;
        if (poll(&pfd, 1, timeout_ms) <= 0) { *err = "connect timeout"; close(fd); return -1; }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
        if (soerr) {
            *err = soerr == ECONNREFUSED ? "connection refused" : "connect failed";
            close(fd);
            return -1;
        }
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    set_timeouts(fd, timeout_ms);
    return fd;
}

/* Send req, read up to n bytes into buf; returns bytes read or -1 with *err. */
static int exchange(const char *hostport, const void *req, size_t reqlen,
                    char *buf, size_t n, const char **err) {
    int fd = dial(hostport, 1000, err), got;
    if (fd < 0) return -1;
    if (write(fd, req, reqlen) != (ssize_t)reqlen) { *err = "write failed"; close(fd); return -1; }
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

static void respond(int fd, int code, const char *reason, const char *ctype, const char *body) {
    char head[512];
    size_t blen = strlen(body);
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                        "Connection: close\r\nServer: labweb/%s\r\n\r\n",
                        code, reason, ctype, blen, version);
    if (write(fd, head, hlen) < 0) return;
    if (write(fd, body, blen) < 0) return;
}

static void handle(int fd) {
    char req[4096], method[16], path[1024], body[1024];
    size_t used = 0;
    ssize_t got;
    char *eol;

    set_timeouts(fd, 5000);
    while (used < sizeof req - 1) {
        got = read(fd, req + used, sizeof req - 1 - used);
        if (got <= 0) break;
        used += got;
        req[used] = 0;
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n")) break;
    }
    req[used] = 0;
    if (used == 0) return;
    eol = strpbrk(req, "\r\n");
    if (eol) *eol = 0;
    printf("request: %s\n", req);

    if (sscanf(req, "%15s %1023s", method, path) != 2) {
        respond(fd, 400, "Bad Request", "text/plain", "bad request\n");
        return;
    }
    { char *q = strchr(path, '?'); if (q) *q = 0; }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        respond(fd, 405, "Method Not Allowed", "text/plain", "method not allowed\n");
    } else if (strcmp(path, "/health") == 0) {
        const char *pg = check_postgres(), *rd = check_redis();
        int ok = strcmp(pg, "ok") == 0 && strcmp(rd, "ok") == 0;
        snprintf(body, sizeof body,
                 "{\"status\":\"%s\",\"version\":\"%s\",\"checks\":{\"postgres\":\"%s\",\"redis\":\"%s\"}}",
                 ok ? "ok" : "fail", version, pg, rd);
        if (!ok) printf("health: fail postgres=%s redis=%s\n", pg, rd);
        respond(fd, ok ? 200 : 503, ok ? "OK" : "Service Unavailable", "application/json", body);
    } else if (strcmp(path, "/") == 0) {
        snprintf(body, sizeof body, "labweb %s\n", version);
        respond(fd, 200, "OK", "text/plain", body);
    } else {
        respond(fd, 404, "Not Found", "text/plain", "not found\n");
    }
}

int main(void) {
    const char *p = getenv("LABWEB_PORT"), *v = getenv("LABWEB_VERSION"), *b = getenv("LABWEB_BROKEN");
    int port = p && *p ? atoi(p) : 18080, one = 1, lfd, cfd;
    struct sockaddr_in sa;

    setvbuf(stdout, NULL, _IONBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (v && *v) version = v;
    if (b && strcmp(b, "1") == 0) {
        fprintf(stderr, "FATAL: required setting LABWEB_CONFIG is missing (broken release)\n");
        return 1;
    }

    lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0) { perror("socket"); return 1; }
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); return 1; }
    if (listen(lfd, 64) < 0) { perror("listen"); return 1; }
    printf("labweb %s listening on 127.0.0.1:%d\n", version, port);

    for (;;) {
        cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno == EINTR) continue;
            perror("accept");
            continue;
        }
        handle(cfd);
        close(cfd);
    }
}
