/* The floor: a minimal single-threaded epoll echo server on 127.0.0.1:PORT.
 * Level-triggered; a connection whose echo can't be written in full stops
 * reading until the rest is written (EPOLLOUT), so it is correct under bulk
 * streaming too.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSZ 65536

typedef struct {
    int fd;
    size_t off, len; /* unsent echo in buf[off:len] */
    char buf[BUFSZ];
} conn_t;

static void drop(conn_t *c) {
    close(c->fd);
    free(c);
}

/* Write the pending echo; 1 all written, 0 would block, -1 error. */
static int flush(conn_t *c) {
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->off += (size_t)n;
    }
    c->off = c->len = 0;
    return 1;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9876;
    if (port <= 0 || port > 65535) {
        puts("Invalid port");
        return 1;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("Echo server listening on 127.0.0.1:%d\n", port);
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR) return 1;
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break; /* EAGAIN, or an error: epoll retries */
                    conn_t *nc = malloc(sizeof *nc);
                    if (!nc) {
                        close(fd);
                        continue;
                    }
                    nc->fd = fd;
                    nc->off = nc->len = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (c->len) { /* waiting to finish an echo */
                int r = flush(c);
                if (r < 0) drop(c);
                else if (r > 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                }
                continue;
            }
            ssize_t got = recv(c->fd, c->buf, BUFSZ, 0);
            if (got < 0 && errno == EAGAIN) continue;
            if (got <= 0) {
                drop(c);
                continue;
            }
            c->len = (size_t)got;
            int r = flush(c);
            if (r < 0) drop(c);
            else if (r == 0) {
                struct epoll_event cev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
        }
    }
}
