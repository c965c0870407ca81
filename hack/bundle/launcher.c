/*
 * The node bundle's launcher: every bin/ entry of the bundle is a link to this program.
 *
 * The bundle carries its own C library and dynamic loader, so its programs must never be
 * loaded by the host's loader (whose glibc may be older, or absent). An ELF interpreter
 * path is absolute and the bundle may be unpacked anywhere, so the programs cannot name
 * their loader themselves: this static launcher finds the bundle's root from its own
 * location and runs the program through the bundle's loader explicitly, with the bundle's
 * library directory only and the host's loader cache ignored. Nothing is inherited by the
 * program's children (no LD_LIBRARY_PATH), so host tools that CRIU or runc start keep
 * using the host's libraries.
 *
 * Python entries run the bundled interpreter in isolated mode (-I): no PYTHON* variable,
 * user site or working directory steers code that runs as root. The loader's own variables
 * (LD_PRELOAD, LD_AUDIT, LD_LIBRARY_PATH, ...), glibc's tunables and CRIU's plugin folder
 * are removed from the environment for the same reason: a loader run by hand does not
 * ignore them as it would for a set-id program. CRIU loads plugins from the bundle's
 * lib/criu only: plugins built for another CRIU must not be loaded into this one.
 *
 * What the bundle does not carry on purpose is still looked up in the host's standard
 * library folders when asked for by name: the NVIDIA driver's NVML, which must match the
 * host's kernel module. /etc/ld.so.preload cannot be turned off (`hotrestart doctor` warns).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LIBDIR "lib/x86_64-linux-gnu"
#define LOADER LIBDIR "/ld-linux-x86-64.so.2"
#define PYTHON "libexec/python3"

struct entry {
    const char *name;   /* the bin/ name this entry answers to */
    const char *target; /* an ELF program of the bundle, or NULL for the interpreter */
    const char *script; /* for the interpreter: the script to run, or NULL */
};

static const struct entry entries[] = {
    {"containerd-shim-hotrestart-v2", NULL, "libexec/hotrestart/containerd-shim-hotrestart-v2"},
    {"hotrestart", NULL, "libexec/hotrestart/hotrestart"},
    {"crit", NULL, "libexec/hotrestart/crit"},
    {"python3", NULL, NULL},
    {"criu", "libexec/criu", NULL},
};

/* Variables that would steer the loader, the C library or CRIU's plugin search. */
static int steering(const char *entry) {
    return strncmp(entry, "LD_", 3) == 0 || strncmp(entry, "GLIBC_TUNABLES=", 15) == 0 ||
           strncmp(entry, "CRIU_LIBS_DIR=", 14) == 0;
}

static void scrub_environment(void) {
    char **in, **out;
    for (in = out = environ; *in; in++)
        if (!steering(*in))
            *out++ = *in;
    *out = NULL;
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "hotrestart bundle launcher: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(127);
}

static char *join(const char *root, const char *rel) {
    size_t n = strlen(root) + 1 + strlen(rel) + 1;
    char *out;
    if (n > PATH_MAX)
        die("path too long", rel);
    out = malloc(n);
    if (!out)
        die("out of memory", NULL);
    snprintf(out, n, "%s/%s", root, rel);
    return out;
}

/* The bundle's root: two levels above the launcher itself (bin/ or libexec/). */
static char *bundle_root(const char *argv0) {
    static char self[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    char *slash;
    int level;
    if (len > 0) {
        self[len] = '\0';
    } else if (!realpath(argv0, self)) {
        die("cannot find the bundle (no /proc/self/exe, and argv[0] does not resolve)", argv0);
    }
    for (level = 0; level < 2; level++) {
        slash = strrchr(self, '/');
        if (!slash || slash == self)
            die("the launcher is not inside a bundle", self);
        *slash = '\0';
    }
    return self;
}

int main(int argc, char **argv) {
    const char *name;
    const struct entry *e = NULL;
    char *root, **args;
    size_t i, n = 0;

    if (argc < 1 || !argv[0])
        die("no program name", NULL);
    name = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];

    for (i = 0; i < sizeof entries / sizeof entries[0]; i++)
        if (strcmp(name, entries[i].name) == 0)
            e = &entries[i];
    if (!e)
        die("unknown program name", name);
    root = bundle_root(argv[0]);
    scrub_environment();
    if (e->target && setenv("CRIU_LIBS_DIR", join(root, "lib/criu"), 1) != 0)
        die("cannot set CRIU_LIBS_DIR", strerror(errno));

    args = calloc((size_t)argc + 12, sizeof *args);
    if (!args)
        die("out of memory", NULL);
    args[n++] = join(root, LOADER);
    args[n++] = "--inhibit-cache";
    args[n++] = "--library-path";
    args[n++] = join(root, LIBDIR);
    args[n++] = "--argv0";
    if (e->target) {
        args[n++] = join(root, e->target);
        args[n++] = join(root, e->target);
    } else {
        /* argv[0] names the python3 entry, so the interpreter's prefix is the bundle's root
         * and sys.executable is this launcher: children it starts run the same way. */
        args[n++] = join(root, "bin/python3");
        args[n++] = join(root, PYTHON);
        args[n++] = "-I";
        args[n++] = "-B"; /* the bundle is read-only at run time: its bytecode is built in */
        if (e->script)
            args[n++] = join(root, e->script);
    }
    for (i = 1; i < (size_t)argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    execv(args[0], args);
    die("cannot run the bundle's loader", strerror(errno));
    return 127;
}
