/*
 * LD_PRELOAD shim for aarch64 programs under qemu-user: open("/proc/cpuinfo") reads the file
 * named by $EDGECC_FAKE_CPUINFO instead.
 *
 * Why: qemu-user 7.2 does not emulate /proc/cpuinfo for aarch64 guests, so a guest reads the
 * x86 host's file. ONNX Runtime's CPU probe (the cpuinfo library) finds no "CPU implementer" /
 * "CPU part" lines there and crashes on a NULL pointer at import. A Cortex-A72 cpuinfo text
 * (written by scripts/benchmark_arm.py) gives it what a Raspberry Pi 4 would show.
 *
 * Build: aarch64-linux-gnu-gcc -O2 -shared -fPIC -o cpuinfo_shim.so cpuinfo_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *redirect(const char *path)
{
    const char *fake = getenv("EDGECC_FAKE_CPUINFO");
    return (fake && path && strcmp(path, "/proc/cpuinfo") == 0) ? fake : path;
}

static mode_t mode_of(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...)
{
    static int (*real)(const char *, int, ...);
    if (!real) real = dlsym(RTLD_NEXT, "open");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_of(flags, ap);
    va_end(ap);
    return real(redirect(path), flags, mode);
}

int open64(const char *path, int flags, ...)
{
    static int (*real)(const char *, int, ...);
    if (!real) real = dlsym(RTLD_NEXT, "open64");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_of(flags, ap);
    va_end(ap);
    return real(redirect(path), flags, mode);
}

int openat(int dir, const char *path, int flags, ...)
{
    static int (*real)(int, const char *, int, ...);
    if (!real) real = dlsym(RTLD_NEXT, "openat");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_of(flags, ap);
    va_end(ap);
    return real(dir, redirect(path), flags, mode);
}

FILE *fopen(const char *path, const char *mode)
{
    static FILE *(*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "fopen");
    return real(redirect(path), mode);
}

FILE *fopen64(const char *path, const char *mode)
{
    static FILE *(*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "fopen64");
    return real(redirect(path), mode);
}
