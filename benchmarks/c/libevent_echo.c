/* The libevent chapter's echo server (evconnlistener + bufferevent), bound
 * to 127.0.0.1:PORT for the benchmarks. Same shape as the example in
 * "Connection listeners: accepting TCP connections": CLOSE_ON_FREE |
 * REUSEABLE, backlog -1, the read callback moves all input to the output,
 * the event callback frees the bufferevent on EOF or error.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static void echo_read_cb(struct bufferevent *bev, void *ctx) {
    (void)ctx;
    evbuffer_add_buffer(bufferevent_get_output(bev), bufferevent_get_input(bev));
}

static void echo_event_cb(struct bufferevent *bev, short events, void *ctx) {
    (void)ctx;
    if (events & BEV_EVENT_ERROR) perror("Error from bufferevent");
    if (events & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) bufferevent_free(bev);
}

static void accept_conn_cb(struct evconnlistener *listener, evutil_socket_t fd,
                           struct sockaddr *address, int socklen, void *ctx) {
    (void)address;
    (void)socklen;
    (void)ctx;
    struct event_base *base = evconnlistener_get_base(listener);
    struct bufferevent *bev = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(bev, echo_read_cb, NULL, echo_event_cb, NULL);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

static void accept_error_cb(struct evconnlistener *listener, void *ctx) {
    (void)ctx;
    int err = EVUTIL_SOCKET_ERROR();
    fprintf(stderr, "Got an error %d (%s) on the listener. Shutting down.\n", err,
            evutil_socket_error_to_string(err));
    event_base_loopexit(evconnlistener_get_base(listener), NULL);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9876;
    if (port <= 0 || port > 65535) {
        puts("Invalid port");
        return 1;
    }
    /* libevent writes with plain send(): a client that resets a connection
     * with unread echo in flight would otherwise kill the server with
     * SIGPIPE (the chapter's example leaves this out; real servers don't). */
    signal(SIGPIPE, SIG_IGN);
    struct event_base *base = event_base_new();
    if (!base) {
        puts("Couldn't open event base");
        return 1;
    }
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sin.sin_port = htons((unsigned short)port);
    struct evconnlistener *listener = evconnlistener_new_bind(
        base, accept_conn_cb, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, -1,
        (struct sockaddr *)&sin, sizeof sin);
    if (!listener) {
        perror("Couldn't create listener");
        return 1;
    }
    evconnlistener_set_error_cb(listener, accept_error_cb);
    printf("Echo server listening on 127.0.0.1:%d\n", port);
    fflush(stdout);
    event_base_dispatch(base);
    evconnlistener_free(listener);
    event_base_free(base);
    return 0;
}
