/* Load generator for the echo-server benchmarks (see benchmarks/run.py).
 *
 * One process, one epoll loop per thread (threads default to the number of
 * CPUs in this process's affinity mask, so `taskset` decides). Every byte
 * echoed back is checked against what was sent; a wrong or missing byte is a
 * "mismatch", a failed connect/read/write an "error". The server's CPU time
 * (utime+stime from /proc/PID/stat) and VmRSS, summed over its process tree
 * (the server and all its descendants, e.g. a supervisor and its workers),
 * are read here, at the exact edges of the measurement window.
 *
 *   loadgen MODE PORT [-c conns] [-d seconds] [-w warmup] [-p server_pid]
 *           [-s size] [-t threads]
 *   MODE: rate  connect, SIZE-byte round trip, close; repeat (conns at once)
 *         rt    SIZE-byte round trips on conns persistent connections
 *         bulk  stream through conns connections, echoed MB/s
 *         idle  open conns connections (one round trip each), hold them,
 *               report the server's VmRSS before and after
 * Prints one JSON object on stdout. Every loop is bounded by the clock.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { M_RATE, M_RT, M_BULK, M_IDLE };
enum state { S_FREE, S_CONNECTING, S_WAITING, S_IDLE, S_STREAM };

#define MAXSIZE 4096
#define CHUNK 65536
#define WINDOW (256 * 1024)
#define PLEN 65521 /* prime, so the pattern never lines up with chunks */
#define NBUCKETS 2048
#define IDLE_INFLIGHT 128

static enum mode mode;
static int port, nconns = 50, nthreads = 0, size = 64;
static double duration = 1.0, warmup = 0.3;
static int server_pid = 0;
static atomic_int phase; /* 0 warmup, 1 measuring, 2 stop */
static atomic_int idle_ready;
static unsigned char pattern[PLEN + CHUNK];

typedef struct {
    int fd;
    int state;
    int idx;
    int want_out;
    uint64_t seq, t0;
    int sent, got;
    uint64_t bsent, brecv;
    unsigned char req[MAXSIZE];
} conn_t;

typedef struct {
    int id, first, count;
    pthread_t th;
    uint64_t ops, bytes, errors, mismatches;
    uint64_t hist[NBUCKETS];
    int inflight, opened;
} worker_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int bucket(uint64_t v) {
    if (v < 64) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int e = msb - 5; /* v >> e in [32, 63] */
    int idx = 64 + (e - 1) * 32 + (int)((v >> e) - 32);
    return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

static double bucket_value(int idx) {
    if (idx < 64) return idx;
    int e = (idx - 64) / 32 + 1;
    uint64_t m = (uint64_t)((idx - 64) % 32 + 32);
    return (double)(m << e) + (double)(1ull << e) / 2.0;
}

/* utime+stime (clock ticks) and parent pid of process PID, from
 * /proc/PID/stat; 0 on success, -1 if it is gone or unreadable. */
static int read_stat(int pid, int *ppid, unsigned long long *ticks) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    /* after ") ": state(3) ppid(4) pgrp session tty tpgid flags minflt
     * cminflt majflt cmajflt utime(14) stime(15) */
    if (!p || sscanf(p + 2, "%*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
                     ppid, &ut, &st) != 3)
        return -1;
    *ticks = (unsigned long long)ut + st;
    return 0;
}

static long read_rss_kb(int pid) {
    char path[64], buf[512];
    long kb = 0;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    while (fgets(buf, sizeof buf, f))
        if (sscanf(buf, "VmRSS: %ld kB", &kb) == 1) break;
    fclose(f);
    return kb;
}

/* The server's CPU time and VmRSS, summed over its whole process tree (the
 * server and every descendant: a supervisor and its workers), found by
 * scanning /proc/[0-9]* for parent pids (/proc/PID/task/TID/children needs
 * CONFIG_PROC_CHILDREN, which not every kernel has). A single-process
 * server is a tree of one. Sets *nprocs to the tree's size. */
static void read_server(double *cpu_s, long *rss_kb, int *nprocs) {
    *cpu_s = -1;
    *rss_kb = -1;
    *nprocs = 0;
    if (server_pid <= 0) return;
    enum { MAXP = 65536 };
    static int pids[MAXP], ppids[MAXP];
    static unsigned long long ticks[MAXP];
    static unsigned char in_tree[MAXP];
    int n = 0;
    DIR *d = opendir("/proc");
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < MAXP) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
        int pid = atoi(e->d_name);
        if (read_stat(pid, &ppids[n], &ticks[n]) == 0) {
            pids[n] = pid;
            in_tree[n] = pid == server_pid;
            n++;
        }
    }
    closedir(d);
    /* Mark descendants until nothing changes (depth is tiny in practice). */
    for (int changed = 1; changed;) {
        changed = 0;
        for (int i = 0; i < n; i++) {
            if (in_tree[i]) continue;
            for (int j = 0; j < n; j++)
                if (in_tree[j] && pids[j] == ppids[i]) {
                    in_tree[i] = 1;
                    changed = 1;
                    break;
                }
        }
    }
    unsigned long long sum = 0;
    long rss = 0;
    int count = 0;
    for (int i = 0; i < n; i++) {
        if (!in_tree[i]) continue;
        sum += ticks[i];
        rss += read_rss_kb(pids[i]);
        count++;
    }
    if (count == 0) return; /* the server is gone */
    *cpu_s = (double)sum / (double)sysconf(_SC_CLK_TCK);
    *rss_kb = rss;
    *nprocs = count;
}

static void fill_req(conn_t *c) {
    for (int i = 0; i < size; i++)
        c->req[i] = (unsigned char)(c->seq * 131u + (uint64_t)c->idx * 7u + (uint64_t)i);
    c->seq++;
    c->sent = c->got = 0;
}

static void set_events(int ep, conn_t *c, uint32_t ev, int op) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &e);
}

static void close_conn(worker_t *w, conn_t *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    if (c->state == S_CONNECTING || c->state == S_WAITING) w->inflight--;
    c->state = S_FREE;
}

static int start_conn(worker_t *w, int ep, conn_t *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        w->errors++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Spread source addresses over 127.0.0.2-127.0.0.33: the client closes
     * first, so its side keeps TIME_WAIT, and with one source address the
     * kernel's ephemeral-port search (28k ports) becomes the bottleneck. */
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 2 + (uint32_t)(w->opened % 32));
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        w->errors++;
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->t0 = now_ns();
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        w->errors++;
        close(fd);
        c->fd = -1;
        return -1;
    }
    c->state = S_CONNECTING;
    w->inflight++;
    w->opened++;
    c->bsent = c->brecv = (uint64_t)c->idx * 977u;
    set_events(ep, c, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

/* Send what is left of the request; 0 ok, -1 error. */
static int send_req(worker_t *w, int ep, conn_t *c) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, c->req + c->sent, (size_t)(size - c->sent), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                set_events(ep, c, EPOLLOUT, EPOLL_CTL_MOD);
                return 0;
            }
            w->errors++;
            return -1;
        }
        c->sent += (int)n;
    }
    set_events(ep, c, EPOLLIN, EPOLL_CTL_MOD);
    return 0;
}

static void bulk_events(worker_t *w, int ep, conn_t *c, uint32_t ev) {
    unsigned char buf[CHUNK];
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        for (int loops = 0; loops < 16; loops++) {
            ssize_t n = recv(c->fd, buf, sizeof buf, 0);
            if (n == 0 || (n < 0 && errno != EAGAIN)) {
                w->errors++;
                close_conn(w, c);
                return;
            }
            if (n < 0) break;
            if (memcmp(buf, pattern + c->brecv % PLEN, (size_t)n) != 0) {
                w->mismatches++;
                close_conn(w, c);
                return;
            }
            c->brecv += (uint64_t)n;
            if (atomic_load_explicit(&phase, memory_order_relaxed) == 1)
                w->bytes += (uint64_t)n;
        }
    }
    if (ev & EPOLLOUT) {
        while (c->bsent - c->brecv < WINDOW) {
            size_t len = WINDOW - (c->bsent - c->brecv);
            if (len > CHUNK) len = CHUNK;
            ssize_t n = send(c->fd, pattern + c->bsent % PLEN, len, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) break;
                w->errors++;
                close_conn(w, c);
                return;
            }
            c->bsent += (uint64_t)n;
        }
    }
    int want = c->bsent - c->brecv < WINDOW;
    if (want != c->want_out) {
        c->want_out = want;
        set_events(ep, c, EPOLLIN | (want ? EPOLLOUT : 0), EPOLL_CTL_MOD);
    }
}

static void on_event(worker_t *w, int ep, conn_t *c, uint32_t ev) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            w->errors++;
            close_conn(w, c);
            return;
        }
        if (mode == M_BULK) {
            c->state = S_STREAM;
            w->inflight--;
            c->want_out = 1;
            set_events(ep, c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
            bulk_events(w, ep, c, EPOLLOUT);
            return;
        }
        c->state = S_WAITING;
        fill_req(c);
        if (send_req(w, ep, c) < 0) close_conn(w, c);
        return;
    }
    if (c->state == S_STREAM) {
        bulk_events(w, ep, c, ev);
        return;
    }
    if (c->state == S_IDLE) { /* the server closed or sent something: wrong */
        w->errors++;
        close_conn(w, c);
        return;
    }
    if (c->state != S_WAITING) return;
    if ((ev & EPOLLOUT) && c->sent < size) {
        if (send_req(w, ep, c) < 0) close_conn(w, c);
        return;
    }
    unsigned char buf[MAXSIZE];
    ssize_t n = recv(c->fd, buf, (size_t)(size - c->got), 0);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
        w->errors++;
        close_conn(w, c);
        return;
    }
    if (memcmp(buf, c->req + c->got, (size_t)n) != 0) {
        w->mismatches++;
        close_conn(w, c);
        return;
    }
    c->got += (int)n;
    if (c->got < size) return;
    uint64_t t1 = now_ns();
    if (atomic_load_explicit(&phase, memory_order_relaxed) == 1) {
        w->ops++;
        w->hist[bucket(t1 - c->t0)]++;
    }
    if (mode == M_RATE) {
        close_conn(w, c);
        start_conn(w, ep, c);
    } else if (mode == M_RT) {
        c->t0 = t1;
        fill_req(c);
        if (send_req(w, ep, c) < 0) close_conn(w, c);
    } else { /* idle: hold it */
        c->state = S_IDLE;
        w->inflight--;
        atomic_fetch_add(&idle_ready, 1);
        set_events(ep, c, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
    }
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    conn_t *conns = calloc((size_t)w->count, sizeof *conns);
    if (ep < 0 || !conns) {
        w->errors++;
        return NULL;
    }
    for (int i = 0; i < w->count; i++) {
        conns[i].fd = -1;
        conns[i].idx = w->first + i;
    }
    int next = 0;
    struct epoll_event evs[256];
    while (atomic_load(&phase) != 2) {
        /* Open the slots not open yet (idle: at most IDLE_INFLIGHT
         * handshakes at once) and reopen any that died (already counted
         * as an error), so a run always goes on to its deadline. */
        if (mode == M_IDLE) {
            while (next < w->count && w->inflight < IDLE_INFLIGHT) {
                if (start_conn(w, ep, &conns[next]) < 0) break;
                next++;
            }
        } else {
            for (int k = 0; k < w->count; k++)
                if (conns[k].state == S_FREE && start_conn(w, ep, &conns[k]) < 0) break;
        }
        int n = epoll_wait(ep, evs, 256, 20);
        for (int i = 0; i < n; i++) on_event(w, ep, evs[i].data.ptr, evs[i].events);
    }
    for (int i = 0; i < w->count; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    free(conns);
    close(ep);
    return NULL;
}

static void sleep_s(double s) {
    struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: loadgen rate|rt|bulk|idle PORT [-c N] [-d S] [-w S] [-p PID] [-s SIZE] [-t THREADS]\n");
        return 2;
    }
    if (!strcmp(argv[1], "rate")) mode = M_RATE;
    else if (!strcmp(argv[1], "rt")) mode = M_RT;
    else if (!strcmp(argv[1], "bulk")) mode = M_BULK;
    else if (!strcmp(argv[1], "idle")) mode = M_IDLE;
    else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    port = atoi(argv[2]);
    int opt;
    optind = 3;
    while ((opt = getopt(argc, argv, "c:d:w:p:s:t:")) != -1) {
        switch (opt) {
        case 'c': nconns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'p': server_pid = atoi(optarg); break;
        case 's': size = atoi(optarg); break;
        case 't': nthreads = atoi(optarg); break;
        default: return 2;
        }
    }
    if (size < 1 || size > MAXSIZE || nconns < 1 || port < 1 || duration <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nconns + 64 > rl.rlim_cur) {
        fprintf(stderr, "RLIMIT_NOFILE %lu too low for %d connections\n",
                (unsigned long)rl.rlim_cur, nconns);
        return 2;
    }
    if (nthreads <= 0) {
        cpu_set_t set;
        nthreads = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    }
    if (nthreads > nconns) nthreads = nconns;
    for (int i = 0; i < PLEN + CHUNK; i++)
        pattern[i] = (unsigned char)((unsigned)(i % PLEN) * 2654435761u >> 24);

    double cpu0, cpu1;
    long rss0, rss1;
    int np0, np1;
    read_server(&cpu0, &rss0, &np0);
    long rss_before = rss0;

    worker_t *ws = calloc((size_t)nthreads, sizeof *ws);
    int first = 0;
    for (int i = 0; i < nthreads; i++) {
        ws[i].id = i;
        ws[i].first = first;
        ws[i].count = nconns / nthreads + (i < nconns % nthreads);
        first += ws[i].count;
        pthread_create(&ws[i].th, NULL, worker_main, &ws[i]);
    }
    double elapsed;
    int held = 0;
    if (mode == M_IDLE) {
        uint64_t deadline = now_ns() + (uint64_t)((duration + 30.0) * 1e9);
        while (atomic_load(&idle_ready) < nconns && now_ns() < deadline) sleep_s(0.01);
        held = atomic_load(&idle_ready);
        sleep_s(warmup); /* let the server settle */
        read_server(&cpu1, &rss1, &np1);
        cpu0 = cpu1;
        elapsed = 0;
        atomic_store(&phase, 2);
    } else {
        sleep_s(warmup);
        read_server(&cpu0, &rss0, &np0);
        uint64_t t0 = now_ns();
        atomic_store(&phase, 1);
        sleep_s(duration);
        atomic_store(&phase, 2);
        uint64_t t1 = now_ns();
        read_server(&cpu1, &rss1, &np1);
        elapsed = (double)(t1 - t0) / 1e9;
    }
    uint64_t ops = 0, bytes = 0, errors = 0, mism = 0, total = 0;
    static uint64_t hist[NBUCKETS];
    for (int i = 0; i < nthreads; i++) {
        pthread_join(ws[i].th, NULL);
        ops += ws[i].ops;
        bytes += ws[i].bytes;
        errors += ws[i].errors;
        mism += ws[i].mismatches;
        for (int b = 0; b < NBUCKETS; b++) hist[b] += ws[i].hist[b];
    }
    for (int b = 0; b < NBUCKETS; b++) total += hist[b];
    double p50 = -1, p99 = -1;
    uint64_t cum = 0;
    for (int b = 0; b < NBUCKETS && total; b++) {
        cum += hist[b];
        if (p50 < 0 && cum * 100 >= total * 50) p50 = bucket_value(b) / 1000.0;
        if (p99 < 0 && cum * 100 >= total * 99) p99 = bucket_value(b) / 1000.0;
    }
    printf("{\"mode\": \"%s\", \"threads\": %d, \"conns\": %d, \"elapsed\": %.6f, "
           "\"ops\": %llu, \"bytes\": %llu, \"p50_us\": %.3f, \"p99_us\": %.3f, "
           "\"cpu_s\": %.4f, \"errors\": %llu, \"mismatches\": %llu, "
           "\"rss_before_kb\": %ld, \"rss_after_kb\": %ld, \"held\": %d, "
           "\"server_procs\": %d}\n",
           argv[1], nthreads, nconns, elapsed, (unsigned long long)ops,
           (unsigned long long)bytes, p50, p99, cpu1 - cpu0, (unsigned long long)errors,
           (unsigned long long)mism, rss_before, rss1, held, np1);
    free(ws);
    return 0;
}
