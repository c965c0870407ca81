/* memhog: a stand-in for a stateful service with a slow start, for `make bench` and `make demo`.
 *
 * usage: memhog MIB [WARMUP_SECONDS [once]]
 * Fills MIB MiB of memory, half of every page with pseudo-random bytes and half with zeros
 * (so it compresses to about half), taking at least WARMUP_SECONDS as a slow-starting service
 * would, then prints "ready" and, every 200 ms, a counter and a checksum of the whole buffer
 * that only a faithful restore of its memory keeps. With "once" it exits after filling: the
 * benchmark uses that to have the VM's memory backed before it measures anything. */
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
    for (uint64_t n = 1;; n++) {
        uint64_t sum = 0;
        for (size_t i = 0; i < words; i += 64) sum += buf[i];
        printf("%llu %llu\n", (unsigned long long)n, (unsigned long long)sum);
        fflush(stdout);
        usleep(200000);
    }
}
