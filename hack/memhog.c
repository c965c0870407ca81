/* memhog: a stand-in for a stateful service with a slow start, for `make bench` and `make demo`.
 *
 * usage: memhog MIB [WARMUP_SECONDS [once]]
 * Fills MIB MiB of memory, half of every page with pseudo-random bytes and half with zeros
 * (so it compresses to about half), taking at least WARMUP_SECONDS as a slow-starting service
 * would, then prints "ready" and, every 200 ms, a counter and a checksum of the whole buffer
 * that only a faithful restore of its memory keeps, and the longest time in ms that the
 * process was stopped since the previous line (a ticker thread sees the gap: that is how the
 * benchmark measures the application's frozen time during a checkpoint). With "once" it exits
 * after filling: the benchmark uses that to have the VM's memory backed before it measures
 * anything. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static volatile double max_gap;

static void *ticker(void *arg) {
    (void)arg;
    double last = now();
    for (;;) {
        usleep(1000);
        double t = now();
        if (t - last > max_gap) max_gap = t - last;
        last = t;
    }
    return NULL;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    double warmup = argc > 2 ? atof(argv[2]) : 0;
    size_t size = mib << 20;
    uint64_t *buf = malloc(size);
    if (!buf) { perror("malloc"); return 1; }
    double start = now();
    uint64_t x = (uint64_t)time(NULL) * 2654435761u | 1;
    size_t words = size / 8, page = 4096 / 8;
    for (size_t i = 0; i < words; i++) {
        if (i % page < page / 2) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; buf[i] = x; }
        else buf[i] = 0;
    }
    if (argc > 3) return 0;
    double left = warmup - (now() - start);
    if (left > 0) usleep((useconds_t)(left * 1e6));
    printf("ready after %.2fs\n", now() - start);
    fflush(stdout);
    pthread_t t;
    pthread_create(&t, NULL, ticker, NULL);
    for (uint64_t n = 1;; n++) {
        uint64_t sum = 0;
        for (size_t i = 0; i < words; i += 64) sum += buf[i];
        double gap = max_gap;
        max_gap = 0;
        printf("%llu %llu %.0f\n", (unsigned long long)n, (unsigned long long)sum, gap * 1000);
        fflush(stdout);
        usleep(200000);
    }
}
