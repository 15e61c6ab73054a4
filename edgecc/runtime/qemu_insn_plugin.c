/*
 * edgecc's qemu TCG plugin: count the guest instructions a qemu-user process executes.
 *
 * Built with the host's C compiler by edgecc.runtime.emulation.insn_plugin() and loaded with
 *   qemu-aarch64 -plugin insn.so,out=COUNT.txt[,atomic=on] ...
 * At exit the total number of executed guest instructions is written to COUNT.txt as one decimal
 * line (to qemu's log, i.e. stderr, when no out= is given).
 *
 * Counting: when a translation block (TB) is translated, one increment of its instruction count
 * is attached to every later execution of that TB. By default the increment is TCG inline code
 * (fast, but a plain non-atomic add: exact for a single guest thread, racy with several); with
 * atomic=on a per-TB callback adds atomically (exact with threads, about 2x slower). A TB that
 * exits early (a fault, a syscall that restarts) still counts whole: counts are exact to a few
 * instructions per such event, which is noise next to a model's millions.
 *
 * Debian's qemu-user 7.2 accepts -plugin but ships no qemu-plugin.h, so the few prototypes of
 * plugin API version 1 used here are declared below (they match qemu 7.2's include/qemu/
 * qemu-plugin.h; later qemu releases still accept version 1 plugins).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;
    };
} qemu_info_t;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index,
                                              int64_t num, uint64_t a1, uint64_t a2, uint64_t a3,
                                              uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                                              uint64_t a8);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb,
                                          qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb,
                                    void *userdata);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_outs(const char *string);

EXPORT int qemu_plugin_version = 1;

static uint64_t insns;
static bool atomic_add;
static char *out_path;

/* The marker: lseek(-1, MARK_OFFSET, SEEK_SET); "edgecc" in ASCII. */
#define MARK_OFFSET 0x656467656363ULL
#define MAX_MARKS 64
static int64_t mark_syscall = -1;
static uint64_t marks[MAX_MARKS];
static int n_marks;

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    (void)id, (void)vcpu_index, (void)a4, (void)a5, (void)a6, (void)a7, (void)a8;
    if (num == mark_syscall && a1 == UINT64_MAX && a2 == MARK_OFFSET && a3 == 0 &&
        n_marks < MAX_MARKS) {
        marks[n_marks++] = __atomic_load_n(&insns, __ATOMIC_RELAXED);
    }
}

static void tb_exec(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    __atomic_fetch_add(&insns, (uint64_t)(uintptr_t)userdata, __ATOMIC_RELAXED);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (atomic_add) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)n);
    } else {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
    }
}

static void at_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    char text[32 * (MAX_MARKS + 1)];
    int len = snprintf(text, sizeof text, "%llu\n",
                       (unsigned long long)__atomic_load_n(&insns, __ATOMIC_RELAXED));
    for (int i = 0; i < n_marks; i++) {
        len += snprintf(text + len, sizeof text - len, "%llu\n", (unsigned long long)marks[i]);
    }
    FILE *f = out_path ? fopen(out_path, "w") : NULL;
    if (f) {
        fputs(text, f);
        fclose(f);
    } else {
        qemu_plugin_outs(text);
    }
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                               char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = strdup(argv[i] + 4);
        } else if (strncmp(argv[i], "marksys=", 8) == 0) {
            mark_syscall = strtoll(argv[i] + 8, NULL, 10);
        } else if (strcmp(argv[i], "atomic=on") == 0) {
            atomic_add = true;
        } else if (strcmp(argv[i], "atomic=off") != 0) {
            fprintf(stderr, "edgecc insn plugin: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    if (mark_syscall >= 0) {
        qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    }
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
