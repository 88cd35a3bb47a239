/* useroom native core.
 *
 * Why this file looks the way it does: when a memory cgroup is out of memory
 * with the kernel OOM killer disabled, every task of the group that needs a
 * new page sleeps until user space resolves the OOM. Our watcher thread lives
 * in that group. So everything it does after the notification must touch only
 * pages that are already resident and locked:
 *
 * - its code sits in the "uro_crit" section, whose pages uro_lock_text()
 *   mlocks (the kernel reclaims file pages, libc's and libpython's text
 *   included, before it declares the OOM, so calling a libc wrapper could
 *   refault a page and sleep);
 * - it makes system calls with the syscall instruction, not through libc;
 * - its data (plans, ring) and its stack are in an mmap'd, prefaulted,
 *   mlocked arena;
 * - it never calls malloc, memcpy or anything outside the section
 *   (a test disassembles the section to check this).
 *
 * System calls that allocate kernel memory charged to the group (open, the
 * first read of a seq_file, write to a pipe) fail with ENOMEM during the OOM,
 * so every fd is opened by Python before the OOM, and ENOMEM is an expected
 * result on this path, never a fatal one.
 */

#define _GNU_SOURCE
/* Only the stable ABI: the module stays abi3. */
#define Py_LIMITED_API 0x030A0000
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdlib.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>

#include "uro.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_process_mrelease
#define SYS_process_mrelease 448
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

_Static_assert(URO_PLAN_MAX == sizeof(((struct uro_plan *)0)->actions) / sizeof(struct uro_action),
               "plan size");
_Static_assert(URO_PLAN_MAX == sizeof(((struct uro_event *)0)->steps) / sizeof(struct uro_step),
               "steps size");
_Static_assert(URO_DATA_MAX == sizeof(((struct uro_action *)0)->data), "data size");
_Static_assert(URO_NEEDLE_MAX == sizeof(((struct uro_plan *)0)->needle), "needle size");
_Static_assert(URO_SOURCES_MAX == sizeof(((struct uro_group *)0)->sources) / sizeof(struct uro_source),
               "sources size");
_Static_assert(URO_RING_SIZE == sizeof(((struct uro_shared *)0)->ring) / sizeof(struct uro_event),
               "ring size");
_Static_assert(URO_GROUPS_MAX == sizeof(((struct uro_shared *)0)->groups) / sizeof(struct uro_group *),
               "groups size");
_Static_assert(offsetof(struct uro_event, steps) % 8 == 0 && sizeof(struct uro_step) % 8 == 0,
               "records copy in words");
_Static_assert(sizeof(pthread_t) <= sizeof(((struct uro_watcher *)0)->thread), "pthread_t fits");
_Static_assert(URO_CANDS_MAX == sizeof(((struct uro_plan *)0)->cands) / sizeof(struct uro_cand), "cands size");

/* Critical code: its own section (mlocked as a whole), no stack protector
 * (whose failure path calls into libc), and no loop turned into a memset or
 * memcpy call. */
#define URO_CRIT                                                                   \
    __attribute__((section("uro_crit"), noinline, no_stack_protector,             \
                   optimize("no-tree-loop-distribute-patterns")))

/* The linker defines these for a section whose name is a C identifier. */
extern const char __start_uro_crit[] __attribute__((visibility("hidden")));
extern const char __stop_uro_crit[] __attribute__((visibility("hidden")));

/* ---------------------------------------------------------------------- */
/* Raw system calls. */

#if defined(__x86_64__)
#define URO_RAW 1
URO_CRIT static long uro_sys(long n, long a, long b, long c, long d, long e)
{
    unsigned long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return (long)ret;
}
#elif defined(__aarch64__)
#define URO_RAW 1
URO_CRIT static long uro_sys(long n, long a, long b, long c, long d, long e)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4)
                     : "memory", "cc");
    return x0;
}
#else
/* Other architectures go through libc's syscall(); uro_raw_syscalls()
 * reports it so the hardening report can say the path is not fully locked. */
#define URO_RAW 0
static long uro_sys(long n, long a, long b, long c, long d, long e)
{
    long r = syscall(n, a, b, c, d, e);
    return r < 0 ? -errno : r;
}
#endif

int uro_raw_syscalls(void) { return URO_RAW; }

/* Critical, allocation-free, async-signal-safe. */
URO_CRIT static int64_t crit_now(void)
{
    struct timespec ts;
    long r = uro_sys(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&ts, 0, 0, 0);
    if (r < 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Critical, blocking up to ns, allocation-free. */
URO_CRIT static void crit_sleep(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
    uro_sys(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, (long)&ts, 0, 0);
}

/* Critical, blocking up to timeout_ns (< 0: forever); 1 readable, 0 timeout,
 * -errno. poll() on a few fds uses an on-stack table, so it does not allocate. */
URO_CRIT static int crit_wait_readable(int fd, int64_t timeout_ns)
{
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    struct timespec ts, *tsp = 0;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    long r = uro_sys(SYS_ppoll, (long)&p, 1, (long)tsp, 0, 8);
    if (r < 0)
        return (int)r;
    return r > 0 ? 1 : 0;
}

/* ---------------------------------------------------------------------- */
/* The episode: runs the armed plan. Everything here is critical. */

URO_CRIT static void crit_store32(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
URO_CRIT static int32_t crit_load32(int32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }

/* Reads the check file from offset 0 into buf; 1 if it contains the needle,
 * 0 if not (or if the read failed with ENOMEM: under the OOM, kernel
 * allocations charged to the group fail), -errno for other failures
 * (ENODEV, ENOENT: the group is gone). */
URO_CRIT static int crit_check(const struct uro_plan *plan)
{
    char buf[256];
    long n = uro_sys(SYS_pread64, plan->check_fd, (long)buf, sizeof buf, 0, 0);
    if (n == -ENOMEM || n == -EINTR || n == -EAGAIN)
        return 0;
    if (n < 0)
        return (int)n;
    if (plan->below > 0) {
        int64_t v = 0;
        long i = 0;
        while (i < n && buf[i] >= '0' && buf[i] <= '9' && v < ((int64_t)1 << 58))
            v = v * 10 + (buf[i++] - '0');
        return i > 0 && v < plan->below ? 1 : 0;
    }
    uint32_t m = plan->needle_len;
    if (m == 0 || (long)m > n)
        return 0;
    for (long i = 0; i + (long)m <= n; i++) {
        uint32_t j = 0;
        while (j < m && buf[i + j] == plan->needle[j])
            j++;
        if (j == m)
            return 1;
    }
    return 0;
}

/* The gate before the kills. A victim's memory comes back while it exits,
 * page by page, and cgroup v1 wakes the tasks asleep in the group's OOM at
 * each uncharge: they take what came back and, while the victim still
 * exits, run out again, which notifies anew and starts another episode
 * with the victim not gone yet. And once it is gone, each task leaves the
 * OOM (under_oom drops to 0) only when it runs again, which on a busy CPU
 * takes milliseconds. The kernel's killer kills nobody meanwhile: not
 * while its victim exits (oom_evaluate_task aborts the scan), nor while
 * the group has room for the charge (mem_cgroup_out_of_memory looks at the
 * margin first). Neither does the watcher: a CHECK with URO_F_GATE before
 * the first kill waits while a task killed before still exits (the dying
 * list) or the group has room for a page (room_fd, cgroup v1), until the
 * check says the OOM is over or its deadline passes, and returns at once
 * otherwise. crit_room: 1 if the usage is below room_below, 0 if not (or
 * not looked at, or the read failed). */
URO_CRIT static int crit_room(const struct uro_plan *plan)
{
    if (plan->room_fd < 0 || plan->room_below <= 0)
        return 0;
    char buf[32];
    long n = uro_sys(SYS_pread64, plan->room_fd, (long)buf, sizeof buf, 0, 0);
    if (n <= 0)
        return 0;
    int64_t v = 0;
    long i = 0;
    while (i < n && buf[i] >= '0' && buf[i] <= '9' && v < ((int64_t)1 << 58))
        v = v * 10 + (buf[i++] - '0');
    return i > 0 && v < plan->room_below;
}

/* Membership. A pidfd pins a process against pid reuse, not against a
 * move: a task moved out of the group after the refresh (by its service
 * manager, or by the user) charges another group, and the group's OOM is
 * none of its business. So each signal to a task of the group is sent only
 * if the task's /proc/<pid>/cgroup, read just before, holds the group's
 * line (plan->member). That file is opened and read once at the refresh
 * where it can be (a pread at offset 0 then formats the text of now into
 * the seq_file buffer the first read allocated: nothing is charged to the
 * group under its OOM); otherwise it is opened by pid now. A file that
 * cannot be read says no: the signal is not sent (the kernel's killer,
 * which the plan's fallback gives the OOM back to, still can). */

URO_CRIT static long crit_read_proc(int32_t pid, const char *name, char *buf, long size);

/* Whether one of the lines of text is the plan's membership line. */
URO_CRIT static int crit_member_text(const struct uro_plan *plan, const char *text, long n)
{
    long m = (long)plan->member_len;
    long i = 0;
    while (i + m <= n) {
        long j = 0;
        while (j < m && text[i + j] == plan->member[j])
            j++;
        if (j == m)
            return 1;
        while (i < n && text[i] != '\n')
            i++;
        i++;
    }
    return 0;
}

/* 1 if the task is in the plan's group now (or the plan checks no
 * membership), 0 if it is not, -errno if its file cannot be read. fd: its
 * /proc/<pid>/cgroup opened ahead, or -1 to read the file of pid. */
URO_CRIT static int crit_member(const struct uro_plan *plan, int fd, int32_t pid)
{
    if (plan->member_len == 0)
        return 1;
    if (plan->member_len > URO_MEMBER_MAX)
        return -EINVAL;
    char text[2048];
    long n;
    if (fd >= 0)
        n = uro_sys(SYS_pread64, fd, (long)text, sizeof text, 0, 0);
    else if (pid > 0)
        n = crit_read_proc(pid, "cgroup", text, sizeof text);
    else
        return -EINVAL;
    if (n < 0)
        return (int)n;
    return crit_member_text(plan, text, n);
}

/* 0 if signal a may go to the task (fd, pid: as for crit_member; pidfd:
 * its pidfd, or -1), -ESRCH if the task has exited, -EXDEV if it is not in
 * the group, the read's -errno if its file cannot be read. SIGCONT
 * always may: it only undoes the plan's own SIGSTOP, and a task stopped in
 * the group and moved out must not stay stopped. */
URO_CRIT static int crit_signal_allowed(const struct uro_plan *plan, const struct uro_action *a, int pidfd, int fd,
                                        int32_t pid)
{
    if (a->sig == SIGCONT)
        return 0;
    int r = crit_member(plan, fd, pid);
    if (r == 1)
        return 0;
    /* An exited task's file reads nothing (and is gone by pid). */
    if ((pidfd >= 0 && crit_wait_readable(pidfd, 0) == 1) || r == -ENOENT || r == -ESRCH)
        return -ESRCH;
    return r < 0 ? r : -EXDEV;
}

/* Runs action a of plan on fd (fd, or the pidfd of the last pick). */
URO_CRIT static int crit_action(const struct uro_plan *plan, const struct uro_action *a, int fd)
{
    switch (a->kind) {
    case URO_ACT_SIGNAL_PIDFD: {
        /* A process that has exited (a zombie included) makes its pidfd
         * readable; signalling it would "succeed" and free nothing. One we
         * already sent SIGKILL to is dying: the same holds until it is gone. */
        if (a->sig == SIGKILL && __atomic_load_n(&a->fired, __ATOMIC_RELAXED))
            return -ESRCH;
        /* The membership first, the exit after: a live process keeps its
         * pid, so a file read by pid (no member_fd) named it. */
        int r = crit_signal_allowed(plan, a, fd, a->member_fd, a->pid);
        if (r < 0)
            return r;
        r = crit_wait_readable(fd, 0);
        if (r == 1)
            return -ESRCH;
        r = (int)uro_sys(SYS_pidfd_send_signal, fd, a->sig, 0, 0, 0);
        if (r == 0 && a->sig == SIGKILL)
            __atomic_store_n((int32_t *)&a->fired, 1, __ATOMIC_RELAXED);
        return r;
    }
    case URO_ACT_SIGNAL_PID: {
        /* No pidfd: the pid may name another process by now. Its file,
         * read just before the signal, narrows the window to microseconds
         * and keeps the signal inside the group. */
        int r = crit_signal_allowed(plan, a, -1, -1, a->pid);
        if (r < 0)
            return r;
        return (int)uro_sys(SYS_kill, a->pid, a->sig, 0, 0, 0);
    }
    case URO_ACT_WRITE:
        return (int)uro_sys(SYS_pwrite64, fd, (long)a->data, a->len, 0, 0);
    case URO_ACT_MRELEASE:
        return (int)uro_sys(SYS_process_mrelease, fd, 0, 0, 0, 0);
    case URO_ACT_WAKE: {
        uint64_t one = 1;
        long r = uro_sys(SYS_write, fd, (long)&one, sizeof one, 0, 0);
        return r < 0 ? (int)r : 0;
    }
    default:
        return -EINVAL;
    }
}

/* The kB value of the line starting "\n<key>" in a /proc/<pid>/status
 * text, or 0 if there is no such line (a kernel thread has no Vm lines). */
URO_CRIT static int64_t crit_status_kb(const char *buf, long n, const char *key, long klen)
{
    for (long i = 0; i + klen < n; i++) {
        if (buf[i] != '\n')
            continue;
        long j = 0;
        while (j < klen && buf[i + 1 + j] == key[j])
            j++;
        if (j < klen)
            continue;
        long p = i + 1 + klen;
        while (p < n && (buf[p] == ' ' || buf[p] == '\t'))
            p++;
        int64_t v = 0;
        while (p < n && buf[p] >= '0' && buf[p] <= '9' && v < ((int64_t)1 << 50))
            v = v * 10 + (buf[p++] - '0');
        return v;
    }
    return 0;
}

/* A candidate's badness in kB now: VmRSS + VmSwap + VmPTE (kB, the
 * kernel's get_mm_rss + MM_SWAPENTS + mm_pgtables_bytes) / page + adj.
 * -errno if its status cannot be read (ESRCH: it exited). The buffer is on
 * the watcher's locked stack; the text's Vm lines end within its first
 * 2 KiB (Name, Umask, State ... VmPTE, VmSwap precede the signal masks). */
/* Path building without libc: appends text (at most 47 bytes in all, NUL
 * written after) or a number's decimal digits at n; returns the new length. */
URO_CRIT static int crit_append(char *path, int n, const char *text)
{
    while (*text && n < 47)
        path[n++] = *text++;
    path[n] = 0;
    return n;
}

URO_CRIT static int crit_append_uint(char *path, int n, uint32_t v)
{
    char digits[12];
    int d = 0;
    do {
        digits[d++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && d < 12);
    while (d && n < 47)
        path[n++] = digits[--d];
    path[n] = 0;
    return n;
}

/* Reads /proc/<pid>/<name> into buf (opened, read, closed now); the bytes
 * read or -errno. The open may fail under the OOM (ENOMEM: the file's
 * kernel memory is charged to the group); the caller then skips the task. */
URO_CRIT static long crit_read_proc(int32_t pid, const char *name, char *buf, long size)
{
    char path[48];
    int n = crit_append(path, 0, "/proc/");
    n = crit_append_uint(path, n, (uint32_t)pid);
    n = crit_append(path, n, "/");
    n = crit_append(path, n, name);
    long fd = uro_sys(SYS_openat, AT_FDCWD, (long)path, O_RDONLY | O_CLOEXEC, 0, 0);
    if (fd < 0)
        return fd;
    long r = uro_sys(SYS_read, fd, (long)buf, size, 0, 0);
    uro_sys(SYS_close, fd, 0, 0, 0, 0);
    return r;
}

/* Parses oom_score_adj's text (n bytes read: > 0) into *adj. */
URO_CRIT static void crit_parse_adj(const char *buf, long n, int64_t *adj)
{
    int neg = buf[0] == '-';
    int64_t v = 0;
    for (long i = neg; i < n && buf[i] >= '0' && buf[i] <= '9'; i++)
        v = v * 10 + (buf[i] - '0');
    *adj = neg ? -v : v;
}

/* The badness (kB) of a candidate now: its status and its oom_score_adj
 * through the fds opened at the refresh. The adj is read now, since a task
 * may set it after the refresh (stress-ng's workers set 1000 just after
 * their fork: with the refresh's 0 they would lose to their newer siblings
 * found with 1000); if it cannot be read, the refresh's (adj_kb) stands.
 * -EPERM: adj -1000 now (never picked). */
URO_CRIT static int crit_badness(const struct uro_plan *plan, const struct uro_cand *c, int64_t *points)
{
    char buf[3072];
    int64_t adj_kb = c->adj_kb;
    if (c->adj_fd >= 0) {
        long m = uro_sys(SYS_pread64, c->adj_fd, (long)buf, 16, 0, 0);
        if (m > 0) {
            int64_t adj = 0;
            crit_parse_adj(buf, m, &adj);
            if (adj <= -1000)
                return -EPERM;
            adj_kb = adj * plan->limit_kb / 1000;
        }
    }
    long n = uro_sys(SYS_pread64, c->status_fd, (long)buf, sizeof buf, 0, 0);
    if (n < 0)
        return (int)n;
    int64_t kb = crit_status_kb(buf, n, "VmRSS:", 6) + crit_status_kb(buf, n, "VmSwap:", 7) +
                 crit_status_kb(buf, n, "VmPTE:", 6);
    *points = kb + adj_kb;
    return 0;
}

/* The badness (kB) of a task found through cgroup.procs: its status and
 * oom_score_adj read now. -ESRCH-like errors: skip it; -EPERM: adj -1000
 * (never picked). */
URO_CRIT static int crit_badness_pid(const struct uro_plan *plan, int32_t pid, int64_t *points)
{
    char buf[3072];
    int64_t adj = 0;
    long n = crit_read_proc(pid, "oom_score_adj", buf, 16);
    if (n <= 0)
        return n < 0 ? (int)n : -ESRCH;
    crit_parse_adj(buf, n, &adj);
    if (adj <= -1000)
        return -EPERM;
    n = crit_read_proc(pid, "status", buf, sizeof buf);
    if (n < 0)
        return (int)n;
    *points = crit_status_kb(buf, n, "VmRSS:", 6) + crit_status_kb(buf, n, "VmSwap:", 7) +
              crit_status_kb(buf, n, "VmPTE:", 6) + adj * plan->limit_kb / 1000;
    return 0;
}

URO_CRIT static int crit_is_listed(const struct uro_plan *plan, int32_t pid)
{
    uint32_t np = plan->nprotect < 32 ? plan->nprotect : 32;
    for (uint32_t i = 0; i < np; i++)
        if (plan->protect[i] == pid)
            return 1;
    uint32_t nc = plan->ncands < URO_CANDS_MAX ? plan->ncands : URO_CANDS_MAX;
    for (uint32_t i = 0; i < nc; i++)
        if (plan->cands[i].pid == pid)
            return 1;
    return 0;
}

/* The pick of SIGNAL_BEST. */
struct crit_pick {
    int index;               /* the candidate, or -1 */
    int32_t pid;             /* the task picked; 0: none */
    int64_t points;
    int pidfd;               /* a candidate's, or one opened for a found task */
    int owned;               /* pidfd was opened here: the episode closes it */
};

/* Picks the live, not yet killed task with the highest badness now (ties to
 * the later one) among the candidates and, through procs_fd, the group's
 * other tasks, which come after them, as newer. Returns 0 with *out set, or
 * -ESRCH if there is nobody to pick. A candidate whose pidfd is readable
 * has exited (or is a zombie): its memory is already gone; a task whose
 * status cannot be read is exiting. Points may be negative (a negative
 * oom_score_adj), as in the kernel. */
URO_CRIT static int crit_pick(const struct uro_plan *plan, struct crit_pick *out)
{
    out->index = -1;
    out->pid = 0;
    out->points = 0;
    out->pidfd = -1;
    out->owned = 0;
    int found = 0;
    uint32_t n = plan->ncands < URO_CANDS_MAX ? plan->ncands : URO_CANDS_MAX;
    for (uint32_t i = 0; i < n; i++) {
        const struct uro_cand *c = &plan->cands[i];
        int64_t p = 0;
        if (__atomic_load_n(&c->fired, __ATOMIC_RELAXED) || crit_wait_readable(c->pidfd, 0) != 0)
            continue;
        if (crit_badness(plan, c, &p) < 0)
            continue;
        if (!found || p >= out->points) {
            /* Only one that may win is looked at (a read of its file). */
            if (crit_member(plan, c->cgroup_fd, c->pid) != 1)
                continue;
            found = 1;
            out->index = (int)i;
            out->pid = c->pid;
            out->points = p;
        }
    }
    if (plan->procs_fd >= 0) {
        char text[4096];
        long m = -1;
        if (plan->procs_reopen) {
            /* A new open file of the same cgroup.procs loads the list of now;
             * if the open fails for want of memory, the planned file serves. */
            char path[48];
            crit_append_uint(path, crit_append(path, 0, "/proc/self/fd/"), (uint32_t)plan->procs_fd);
            long fd = uro_sys(SYS_openat, AT_FDCWD, (long)path, O_RDONLY | O_CLOEXEC, 0, 0);
            if (fd >= 0) {
                m = uro_sys(SYS_read, fd, (long)text, sizeof text, 0, 0);
                uro_sys(SYS_close, fd, 0, 0, 0, 0);
            }
        }
        if (m < 0)
            m = uro_sys(SYS_pread64, plan->procs_fd, (long)text, sizeof text, 0, 0);
        int32_t pid = 0;
        for (long i = 0; i < m; i++) {
            if (text[i] >= '0' && text[i] <= '9') {
                pid = pid * 10 + (text[i] - '0');
                continue;
            }
            if (pid > 0 && !crit_is_listed(plan, pid)) {
                int64_t p = 0;
                if (crit_badness_pid(plan, pid, &p) == 0 && (!found || p >= out->points) &&
                    crit_member(plan, -1, pid) == 1) {
                    found = 1;
                    out->index = -1;
                    out->pid = pid;
                    out->points = p;
                }
            }
            pid = 0;
        }
    }
    if (!found)
        return -ESRCH;
    if (out->index >= 0) {
        out->pidfd = plan->cands[out->index].pidfd;
    } else {
        long fd = uro_sys(SYS_pidfd_open, out->pid, 0, 0, 0, 0);
        if (fd < 0)
            return (int)fd;
        out->pidfd = (int)fd;
        out->owned = 1;
        /* The list may be older than the pick (v1: the plan's file, if the
         * new open failed): the task pinned now must be in the group now. A
         * pidfd not readable after the read is the process that was read. */
        if (crit_member(plan, -1, out->pid) != 1 || crit_wait_readable(out->pidfd, 0) != 0) {
            uro_sys(SYS_close, fd, 0, 0, 0, 0);
            out->pidfd = -1;
            out->owned = 0;
            return -EXDEV;
        }
    }
    return 0;
}

/* Copies n bytes as 64-bit words (both 8-aligned, n a multiple of 8):
 * a struct assignment may become a call to memcpy, outside the section. */
URO_CRIT static void crit_copy(void *dst, const void *src, size_t n)
{
    uint64_t *d = dst;
    const uint64_t *s = src;
    for (size_t i = 0; i < n / 8; i++)
        d[i] = s[i];
}

/* Publishes a record as the ring's next: the fields first, the sequence
 * number last; then wakes Python. */
URO_CRIT static void crit_publish(struct uro_shared *sh, const struct uro_event *rec)
{
    uint64_t seq = __atomic_load_n(&sh->head, __ATOMIC_ACQUIRE) + 1;
    struct uro_event *ev = &sh->ring[(seq - 1) % URO_RING_SIZE];
    __atomic_store_n(&ev->seq, 0, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    int32_t nsteps = rec->nsteps < URO_PLAN_MAX ? rec->nsteps : URO_PLAN_MAX;
    crit_copy(ev, rec, offsetof(struct uro_event, steps) + (size_t)nsteps * sizeof(struct uro_step));
    __atomic_store_n(&ev->seq, seq, __ATOMIC_RELEASE);
    __atomic_store_n(&sh->head, seq, __ATOMIC_RELEASE);
    if (sh->wake_fd >= 0) {
        uint64_t one = 1;
        uro_sys(SYS_write, sh->wake_fd, (long)&one, sizeof one, 0, 0);
    }
}

/* Starts a record of group g in rec. */
URO_CRIT static void crit_record_init(struct uro_event *rec, const struct uro_group *g, int src,
                                      uint64_t count, int64_t t0, int outcome)
{
    rec->seq = 0;
    rec->group = g->index;
    rec->pad = 0;
    rec->episode = 0;
    rec->source = src;
    rec->outcome = outcome;
    rec->count = count;
    rec->notified_ns = t0;
    rec->acted_ns = 0;
    rec->resolved_ns = 0;
    rec->plan_id = 0;
    rec->plan_slot = -1;
    rec->nsteps = 0;
}

/* Records an event that runs no plan: a forward source fired, or a source
 * is gone. Built on the stack; only its header is copied. */
URO_CRIT static void crit_note(struct uro_shared *sh, const struct uro_group *g, int src, uint64_t count,
                               int64_t t0, int outcome)
{
    struct uro_event rec;
    crit_record_init(&rec, g, src, count, t0, outcome);
    crit_publish(sh, &rec);
}

/* Forgets (closes) the dying victims that have exited; returns how many
 * are left. */
URO_CRIT static int crit_dying_prune(struct uro_group *g)
{
    int32_t kept = 0;
    for (int32_t i = 0; i < g->ndying && i < 8; i++) {
        int fd = g->dying[i];
        if (crit_wait_readable(fd, 0) != 0)
            uro_sys(SYS_close, fd, 0, 0, 0, 0);
        else
            g->dying[kept++] = fd;
    }
    g->ndying = kept;
    return kept;
}

/* Remembers a killed task's pidfd (the watcher's own) until it has exited;
 * the oldest is dropped when the list is full. */
URO_CRIT static void crit_dying_add(struct uro_group *g, int fd)
{
    if (g->ndying >= 8) {
        uro_sys(SYS_close, g->dying[0], 0, 0, 0, 0);
        for (int i = 1; i < 8; i++)
            g->dying[i - 1] = g->dying[i];
        g->ndying = 7;
    }
    g->dying[g->ndying++] = fd;
}

/* Claims the armed plan for this episode. The loop closes the race with a
 * Python thread switching plans between our load and our store. */
URO_CRIT static int crit_claim_plan(struct uro_group *g)
{
    for (;;) {
        int32_t slot = crit_load32(&g->active_plan);
        crit_store32(&g->busy_plan, slot + 1);
        if (crit_load32(&g->active_plan) == slot)
            return slot;
    }
}

URO_CRIT static void crit_drop_pick(struct uro_episode *ep)
{
    if (ep->pick_owned)
        uro_sys(SYS_close, ep->pick_pidfd, 0, 0, 0, 0);
    ep->pick_index = -1;
    ep->pick_pid = 0;
    ep->pick_points = 0;
    ep->pick_pidfd = -1;
    ep->pick_owned = 0;
}

/* Picks the best task and signals it (SIGNAL_BEST after any wait for the
 * last victims); returns the step's result. */
URO_CRIT static int crit_signal_best(struct uro_group *g, const struct uro_plan *plan,
                                     const struct uro_action *a)
{
    struct uro_episode *ep = &g->ep;
    struct crit_pick pick;
    int r = crit_pick(plan, &pick);
    if (r < 0)
        return r;
    ep->pick_index = pick.index;
    ep->pick_pid = pick.pid;
    ep->pick_points = pick.points;
    ep->pick_pidfd = pick.pidfd;
    ep->pick_owned = pick.owned;
    r = (int)uro_sys(SYS_pidfd_send_signal, pick.pidfd, a->sig, 0, 0, 0);
    if (r == 0 && a->sig == SIGKILL) {
        if (pick.index >= 0)
            __atomic_store_n((int32_t *)&plan->cands[pick.index].fired, 1, __ATOMIC_RELAXED);
        /* The watcher's own reference, kept until it exits. */
        long own = pick.owned ? pick.pidfd : uro_sys(SYS_fcntl, pick.pidfd, F_DUPFD_CLOEXEC, 3, 0, 0);
        if (own >= 0)
            crit_dying_add(g, (int)own);
        ep->pick_owned = 0; /* the dying list closes it */
    }
    if (r < 0 && ep->pick_owned) {
        uro_sys(SYS_close, ep->pick_pidfd, 0, 0, 0, 0);
        ep->pick_owned = 0;
        ep->pick_pidfd = -1;
    }
    return r;
}

/* Whether a new notification of the episode's source came (the group ran
 * out again: the OOM lock changed hands, so the action took effect): read
 * by the watcher meanwhile (pending), or readable now. Only an eventfd
 * source tells it: a kernfs file polls readable at all times, and
 * memory.events changes at each memory.high event, not only at an OOM. */
URO_CRIT static int crit_renotified(const struct uro_group *g, int src)
{
    if (src < 0 || src >= URO_SOURCES_MAX || (g->sources[src].kind & URO_SRC_PRI))
        return 0;
    return g->pending[src] || crit_wait_readable(g->sources[src].fd, 0) == 1;
}

/* One look at the wait of the action in progress. Returns 1 with *result
 * set once the wait is over, else 0 with ep->wake_ns set to when to look
 * again. A CHECK is over when the check says resolved (1), when a new
 * notification supersedes the episode (2), when the group is gone (-errno),
 * when its deadline passes (0), or once the victim it waits for has exited
 * and its memory is back: one last check then says whether the group is
 * out of memory again (0), as the kernel's killer, which kills the next
 * task as soon as its victim is gone and the charge still fails. */
URO_CRIT static int crit_wait_step(struct uro_group *g, const struct uro_plan *plan, int64_t now, int *result)
{
    struct uro_episode *ep = &g->ep;
    const struct uro_action *a = &plan->actions[ep->next];
    int64_t step = plan->poll_ns > 0 ? plan->poll_ns : 1000000;
    int64_t left = ep->deadline_ns - now;
    switch (ep->wait) {
    case URO_WAIT_CHECK: {
        int gone = ep->wait_fd >= 0 && crit_wait_readable(ep->wait_fd, 0) == 1;
        int r = crit_check(plan);
        if (r != 0) {
            *result = r;
            return 1;
        }
        if (left <= 0 || gone) {
            *result = 0;
            return 1;
        }
        /* The gate: on while a victim still exits or the group has room. */
        if (ep->gate) {
            if (crit_dying_prune(g) > 0 || crit_room(plan))
                break;
            *result = 0;
            return 1;
        }
        if (ep->supersede && crit_renotified(g, ep->rec.source)) {
            *result = 2;
            return 1;
        }
        break;
    }
    case URO_WAIT_DYING:
        /* The kernel does not pick while its last victim still exits: its
         * memory is on its way back. Neither do we. Once they are gone the
         * step ends without a pick (the check after it says whether their
         * exit ended the OOM); one stuck in the kernel (its memory was
         * reaped by process_mrelease already) lets the pick go ahead at the
         * deadline, as the kernel's does once its reaper has run. */
        if (crit_dying_prune(g) == 0) {
            *result = URO_WAITED;
            return 1;
        }
        if (left <= 0) {
            *result = crit_signal_best(g, plan, a);
            return 1;
        }
        break;
    case URO_WAIT_FD: {
        int r = crit_wait_readable(ep->wait_fd, 0);
        if (r < 0 || (r == 0 && left <= 0)) {
            *result = r < 0 ? r : -ETIMEDOUT;
            return 1;
        }
        if (r == 1) {
            if (!(a->flags & URO_F_READ)) {
                *result = 1;
                return 1;
            }
            uint64_t v = 0;
            long n = uro_sys(SYS_read, ep->wait_fd, (long)&v, sizeof v, 0, 0);
            *result = n < 0 ? (int)n : v > 0x7fffffff ? 0x7fffffff : (int)v;
            return 1;
        }
        break;
    }
    default:
        *result = -EINVAL;
        return 1;
    }
    ep->wake_ns = now + (left < step ? left : step);
    return 0;
}

/* The action in progress returned r: record its step and what it means. */
URO_CRIT static void crit_step_done(struct uro_group *g, const struct uro_plan *plan, int r)
{
    struct uro_episode *ep = &g->ep;
    uint32_t i = ep->next;
    const struct uro_action *a = &plan->actions[i];
    int64_t now = crit_now();
    if (a->kind == URO_ACT_CHECK) {
        if (r == 1 && !ep->grant_open) {
            ep->rec.resolved_ns = now;
            ep->outcome = URO_OUT_RESOLVED;
        } else if (r == 2) {
            ep->rec.resolved_ns = now;
            ep->outcome = URO_OUT_SUPERSEDED;
        } else if (r < 0) {
            ep->outcome = URO_OUT_GONE;
        }
        ep->acted_since_check = 0;
    } else if (a->kind == URO_ACT_SIGNAL_BEST) {
        if (r >= 0) {
            ep->acted_since_check = 1;
            ep->ran |= (uint64_t)1 << (i & 63);
        }
    } else if (a->flags & URO_F_PICKED) {
        if (r >= 0)
            ep->ran |= (uint64_t)1 << (i & 63);
    } else if (r >= 0) {
        ep->acted_since_check = 1;
        ep->ran |= (uint64_t)1 << (i & 63);
        if (a->flags & URO_F_OPENS)
            ep->grant_open = 1;
        if ((a->flags & URO_F_RESOLVES) || ((a->flags & URO_F_SETTLES) && r == URO_SETTLED)) {
            ep->grant_open = 0;
            if (!ep->outcome) {
                ep->rec.resolved_ns = now;
                ep->outcome = URO_OUT_RESOLVED;
            }
        }
    }
    int32_t k = ep->rec.nsteps;
    if (k < URO_PLAN_MAX) {
        struct uro_step *s = &ep->rec.steps[k];
        int best = a->kind == URO_ACT_SIGNAL_BEST;
        s->index = (int32_t)i;
        s->kind = a->kind;
        s->result = r;
        s->pick = best ? ep->pick_index : -1;
        s->points = best ? ep->pick_points : 0;
        s->pid = best ? ep->pick_pid : 0;
        s->pad = 0;
        s->t0_ns = ep->t0_ns;
        s->t_ns = now;
        ep->rec.nsteps = k + 1;
    }
    ep->wait = URO_WAIT_NONE;
    ep->next = i + 1;
}

/* Begins the action at ep->next: 1 if it returned at once (*result set),
 * 0 if it waits (ep->wait set), -1 if it is skipped. */
URO_CRIT static int crit_step_begin(struct uro_group *g, const struct uro_plan *plan, int *result)
{
    struct uro_episode *ep = &g->ep;
    const struct uro_action *a = &plan->actions[ep->next];
    /* Once the episode is resolved, only restores still run; an action
     * guarded by another runs only if that one took effect. */
    if (ep->outcome && !(a->flags & URO_F_ALWAYS))
        return -1;
    if (a->guard >= 0 && !(ep->ran & ((uint64_t)1 << (a->guard & 63))))
        return -1;
    /* A restore with no grant open (it succeeded already) is moot. */
    if ((a->flags & URO_F_RESOLVES) && (a->flags & URO_F_ALWAYS) && !ep->grant_open)
        return -1;
    if ((a->flags & URO_F_IF_CLEAR) && ep->has_check && crit_check(plan) != 1)
        return -1;
    int64_t t0 = crit_now();
    ep->t0_ns = t0;
    if (!ep->rec.acted_ns)
        ep->rec.acted_ns = t0;
    switch (a->kind) {
    case URO_ACT_CHECK:
        /* Nothing took effect since the last check (say, every victim had
         * already exited): waiting would only lose time. With a grant open
         * the check only waits for the sleepers to wake: the restore of
         * the limit is what resolves the episode. */
        if (a->flags & URO_F_GATE) {
            /* Before the kills: see crit_room. */
            if (ep->outcome || !ep->has_check || (crit_dying_prune(g) == 0 && !crit_room(plan))) {
                *result = 0;
                return 1;
            }
            ep->gate = 1;
            ep->supersede = 0;
            ep->wait_fd = -1;
            ep->deadline_ns = t0 + a->timeout_ns;
            ep->wait = URO_WAIT_CHECK;
            return 0;
        }
        ep->gate = 0;
        if (ep->outcome || !ep->has_check || !ep->acted_since_check) {
            *result = 0;
            return 1;
        }
        ep->supersede = (a->flags & URO_F_SUPERSEDE) != 0;
        ep->wait_fd = !(a->flags & URO_F_EXIT) ? -1 : (a->flags & URO_F_PICKED) ? ep->pick_pidfd : a->fd;
        /* No pick to wait for: the pick waited for the last victim to
         * exit instead, so its memory is back. */
        ep->deadline_ns = t0 + ((a->flags & URO_F_EXIT) && (a->flags & URO_F_PICKED) && ep->pick_pidfd < 0
                                    ? 0 : a->timeout_ns);
        ep->wait = URO_WAIT_CHECK;
        return 0;
    case URO_ACT_SIGNAL_BEST:
        crit_drop_pick(ep);
        if (crit_dying_prune(g) > 0) {
            ep->deadline_ns = t0 + a->timeout_ns;
            ep->wait = URO_WAIT_DYING;
            return 0;
        }
        *result = crit_signal_best(g, plan, a);
        return 1;
    case URO_ACT_AWAIT:
        if ((a->flags & URO_F_PICKED) && ep->pick_pidfd < 0) {
            *result = -ESRCH; /* acts on the last pick: it picked nobody */
            return 1;
        }
        ep->wait_fd = (a->flags & URO_F_PICKED) ? ep->pick_pidfd : a->fd;
        ep->deadline_ns = t0 + a->timeout_ns;
        ep->wait = URO_WAIT_FD;
        return 0;
    default:
        if (a->flags & URO_F_PICKED) /* acts on the last pick (and only if its signal went out) */
            *result = ep->pick_pidfd < 0 ? -ESRCH : crit_action(plan, a, ep->pick_pidfd);
        else
            *result = crit_action(plan, a, a->fd);
        /* A SIGKILL the gate must see out (the pick adds its own). */
        if (a->kind == URO_ACT_SIGNAL_PIDFD && a->sig == SIGKILL && *result == 0 && !(a->flags & URO_F_PICKED)) {
            long own = uro_sys(SYS_fcntl, a->fd, F_DUPFD_CLOEXEC, 3, 0, 0);
            if (own >= 0)
                crit_dying_add(g, (int)own);
        }
        return 1;
    }
}

/* Ends the episode: its last check, its outcome, its record. */
URO_CRIT static void crit_episode_end(struct uro_shared *sh, struct uro_group *g)
{
    struct uro_episode *ep = &g->ep;
    const struct uro_plan *plan = &g->plans[ep->slot];
    crit_drop_pick(ep); /* a found task's pidfd, opened by the pick */
    if (!ep->outcome) {
        if (ep->has_check) {
            int r = crit_check(plan);
            if (r == 1 && ep->grant_open) {
                ep->outcome = URO_OUT_RELIEVED;
            } else if (r == 1) {
                ep->rec.resolved_ns = crit_now();
                ep->outcome = URO_OUT_RESOLVED;
            } else {
                ep->outcome = r < 0 ? URO_OUT_GONE : URO_OUT_UNRESOLVED;
            }
        } else {
            ep->outcome = URO_OUT_ACTED;
        }
    }
    ep->rec.outcome = ep->outcome;
    ep->wait = URO_WAIT_NONE;
    crit_store32(&g->busy_plan, 0);
    crit_store32(&ep->active, 0);
    crit_publish(sh, &ep->rec);
}

/* Runs the episode's actions until one has to wait (returns 1: look again
 * at ep->wake_ns) or the episode ends (returns 0: its record is out). */
URO_CRIT static int crit_episode_run(struct uro_shared *sh, struct uro_group *g)
{
    struct uro_episode *ep = &g->ep;
    const struct uro_plan *plan = &g->plans[ep->slot];
    uint32_t n = plan->count < URO_PLAN_MAX ? plan->count : URO_PLAN_MAX;
    int r = 0;
    for (;;) {
        if (ep->wait != URO_WAIT_NONE) {
            if (!crit_wait_step(g, plan, crit_now(), &r))
                return 1;
            crit_step_done(g, plan, r);
            continue;
        }
        if (ep->next >= n)
            break;
        int began = crit_step_begin(g, plan, &r);
        if (began < 0)
            ep->next++;
        else if (began > 0)
            crit_step_done(g, plan, r);
        /* else: it waits; the loop takes a first look at once */
    }
    crit_episode_end(sh, g);
    return 0;
}

/* Begins an episode of group g for its OOM source src: claims the armed
 * plan and runs it as far as it goes without waiting. Returns 1 if it is
 * still in progress, 0 if it ended. */
URO_CRIT static int crit_episode_begin(struct uro_shared *sh, struct uro_group *g, int src, uint64_t count,
                                       int64_t t0)
{
    struct uro_episode *ep = &g->ep;
    crit_record_init(&ep->rec, g, src, count, t0, 0);
    ep->rec.episode = __atomic_add_fetch(&g->episodes, 1, __ATOMIC_SEQ_CST);
    ep->wait = URO_WAIT_NONE;
    ep->next = 0;
    ep->outcome = 0;
    ep->acted_since_check = 0;
    ep->grant_open = 0;
    ep->ran = 0;
    ep->wait_fd = -1;
    ep->supersede = 0;
    ep->gate = 0;
    ep->wake_ns = 0;
    ep->pick_owned = 0;
    crit_drop_pick(ep);
    int slot = crit_claim_plan(g);
    const struct uro_plan *plan = &g->plans[slot];
    ep->slot = slot;
    ep->rec.plan_slot = slot;
    ep->rec.plan_id = plan->id;
    ep->has_check = plan->check_fd >= 0;
    crit_store32(&ep->active, 1);
    if (plan->count == 0) {
        ep->outcome = URO_OUT_NO_PLAN;
    } else if (ep->has_check) {
        /* A notification with the group not under OOM: the episode was
         * resolved by someone else, or the group was removed (rmdir signals
         * the eventfd once). Act on neither. */
        int r = crit_check(plan);
        if (r == 1)
            ep->outcome = URO_OUT_NOT_NEEDED;
        else if (r < 0)
            ep->outcome = URO_OUT_GONE;
    }
    if (ep->outcome) {
        crit_episode_end(sh, g);
        return 0;
    }
    /* A settling AWAIT's eventfd may hold a late reply to an earlier
     * episode (its wait timed out): this episode's answer starts clean. */
    for (uint32_t i = 0; i < plan->count && i < URO_PLAN_MAX; i++) {
        const struct uro_action *a = &plan->actions[i];
        uint64_t stale;
        if ((a->flags & URO_F_SETTLES) && crit_wait_readable(a->fd, 0) == 1)
            (void)uro_sys(SYS_read, a->fd, (long)&stale, sizeof stale, 0, 0);
    }
    return crit_episode_run(sh, g);
}

/* The epoll data of a group's source, and of the control fd. */
#define CRIT_DATA(index, src) (((uint64_t)(uint32_t)(index) << 8) | (uint64_t)(src))
#define CRIT_CONTROL (~(uint64_t)0)

/* Takes group g out of the table (the watcher's side of uro_group_remove,
 * or Python's while no watcher runs): its sources leave the epoll set, its
 * dying victims' pidfds are closed. */
URO_CRIT static void crit_group_detach(struct uro_shared *sh, struct uro_group *g)
{
    for (int32_t s = 0; s < g->nsources && s < URO_SOURCES_MAX; s++)
        uro_sys(SYS_epoll_ctl, sh->epfd, EPOLL_CTL_DEL, g->sources[s].fd, 0, 0);
    for (int32_t i = 0; i < g->ndying && i < 8; i++)
        uro_sys(SYS_close, g->dying[i], 0, 0, 0, 0);
    g->ndying = 0;
    if (g->index >= 0 && g->index < URO_GROUPS_MAX)
        __atomic_store_n(&sh->groups[g->index], (struct uro_group *)0, __ATOMIC_SEQ_CST);
    g->index = -1;
    crit_store32(&g->state, URO_GROUP_FREE);
}

/* Unlinks g from the list of episodes in progress (prev: the group before
 * it, or null for the head). */
URO_CRIT static void crit_unlink(struct uro_shared *sh, struct uro_group *prev, struct uro_group *g)
{
    if (prev)
        prev->ep.next_active = g->ep.next_active;
    else
        sh->active = g->ep.next_active;
    g->ep.next_active = -1;
    __atomic_sub_fetch(&sh->nactive, 1, __ATOMIC_SEQ_CST);
}

URO_CRIT static void crit_link(struct uro_shared *sh, struct uro_group *g)
{
    g->ep.next_active = sh->active;
    sh->active = g->index;
    __atomic_add_fetch(&sh->nactive, 1, __ATOMIC_SEQ_CST);
}

/* After an episode of g ended: what its sources said meanwhile. An OOM
 * source's count begins the next episode at once (it may find the OOM
 * over: not needed); a forward source's is recorded now. Returns 1 if an
 * episode is in progress again. */
URO_CRIT static int crit_pending(struct uro_shared *sh, struct uro_group *g, int64_t t0)
{
    for (int32_t s = 0; s < g->nsources && s < URO_SOURCES_MAX; s++) {
        uint64_t count = g->pending[s];
        if (!count)
            continue;
        g->pending[s] = 0;
        if ((g->sources[s].kind & URO_SRC_KIND_MASK) != URO_SRC_OOM)
            crit_note(sh, g, s, count, t0, URO_OUT_FORWARDED);
        else if (!__atomic_load_n(&sh->stop, __ATOMIC_SEQ_CST) && crit_episode_begin(sh, g, s, count, t0))
            return 1;
    }
    return 0;
}

/* Looks at every episode in progress whose time has come (or all, with
 * force); returns the earliest time one wants a look again, -1 if none. */
URO_CRIT static int64_t crit_tick(struct uro_shared *sh, int force)
{
    int64_t next = -1;
    struct uro_group *prev = 0;
    int32_t at = sh->active;
    while (at >= 0) {
        struct uro_group *g = sh->groups[at];
        int32_t after = g->ep.next_active;
        int64_t now = crit_now();
        int going = 1;
        if (force || g->ep.wake_ns <= now) {
            going = crit_episode_run(sh, g);
            if (!going)
                going = crit_pending(sh, g, now);
        }
        if (going) {
            if (next < 0 || g->ep.wake_ns < next)
                next = g->ep.wake_ns;
            prev = g;
        } else {
            crit_unlink(sh, prev, g);
        }
        at = after;
    }
    return next;
}

/* Ends an episode in progress now (its group is being removed), recorded
 * as it stands: the restores that did not run yet never will. */
URO_CRIT static void crit_abandon(struct uro_shared *sh, struct uro_group *g)
{
    struct uro_group *prev = 0;
    for (int32_t at = sh->active; at >= 0; at = sh->groups[at]->ep.next_active) {
        if (sh->groups[at] == g) {
            crit_unlink(sh, prev, g);
            break;
        }
        prev = sh->groups[at];
    }
    crit_drop_pick(&g->ep);
    if (!g->ep.outcome)
        g->ep.outcome = URO_OUT_UNRESOLVED;
    g->ep.rec.outcome = g->ep.outcome;
    g->ep.wait = URO_WAIT_NONE;
    crit_store32(&g->busy_plan, 0);
    crit_store32(&g->ep.active, 0);
    crit_publish(sh, &g->ep.rec);
}

/* The control fd fired: take out the groups Python asked to remove. */
URO_CRIT static void crit_control(struct uro_shared *sh)
{
    int32_t n = __atomic_load_n(&sh->ngroups, __ATOMIC_SEQ_CST);
    for (int32_t i = 0; i < n && i < URO_GROUPS_MAX; i++) {
        struct uro_group *g = __atomic_load_n(&sh->groups[i], __ATOMIC_SEQ_CST);
        if (!g || crit_load32(&g->state) != URO_GROUP_REMOVING)
            continue;
        if (crit_load32(&g->ep.active))
            crit_abandon(sh, g);
        crit_group_detach(sh, g);
    }
}

/* epoll_pwait2 (Linux 5.11) waits to the nanosecond; without it the wait
 * rounds up to the next millisecond. */
#ifndef SYS_epoll_pwait2
#define SYS_epoll_pwait2 441
#endif
URO_CRIT static long crit_epoll_wait(struct uro_shared *sh, struct epoll_event *evs, int max, int64_t deadline)
{
    if (deadline < 0)
        return uro_sys(SYS_epoll_pwait, sh->epfd, (long)evs, max, -1, 0);
    int64_t left = deadline - crit_now();
    if (left < 0)
        left = 0;
    if (!sh->no_pwait2) {
        struct timespec ts = {.tv_sec = left / 1000000000LL, .tv_nsec = left % 1000000000LL};
        long n = uro_sys(SYS_epoll_pwait2, sh->epfd, (long)evs, max, (long)&ts, 0);
        if (n != -ENOSYS)
            return n;
        sh->no_pwait2 = 1;
    }
    return uro_sys(SYS_epoll_pwait, sh->epfd, (long)evs, max, (long)((left + 999999) / 1000000), 0);
}

/* A source of g fired: read it (an eventfd's counter; a kernfs file is
 * read again, which re-arms its notification) and act: begin an episode,
 * record a forward, or, during an episode, keep the count for after it. */
URO_CRIT static void crit_source(struct uro_shared *sh, struct uro_group *g, int src, uint32_t events, int64_t t0)
{
    int fd = g->sources[src].fd;
    int kind = g->sources[src].kind;
    uint64_t count = 0;
    long r;
    if (kind & URO_SRC_PRI) {
        /* The seq_file buffer was allocated by Python's first read. A PSI
         * trigger: polling consumed the event; POLLERR: group removed. */
        char buf[256];
        count = 1;
        r = 0;
        if (kind & URO_SRC_REREAD)
            r = uro_sys(SYS_pread64, fd, (long)buf, sizeof buf, 0, 0);
        else if (events & (EPOLLERR | EPOLLHUP))
            r = -ENODEV;
        if (r == -ENODEV || r == -ENOENT) {
            /* Gone: out of the epoll set, so that a file that polls ready
             * forever does not spin us. */
            uro_sys(SYS_epoll_ctl, sh->epfd, EPOLL_CTL_DEL, fd, 0, 0);
            crit_note(sh, g, src, 0, t0, URO_OUT_GONE);
            return;
        }
    } else {
        r = uro_sys(SYS_read, fd, (long)&count, sizeof count, 0, 0);
        if (r == -EAGAIN)
            return;
        if (r < 0)
            count = 0; /* an eventfd read does not fail otherwise; never spin on one */
    }
    if (crit_load32(&g->ep.active)) {
        g->pending[src] += count ? count : 1;
        g->ep.wake_ns = 0; /* a CHECK it waits in may end: superseded */
        return;
    }
    if ((kind & URO_SRC_KIND_MASK) != URO_SRC_OOM) {
        crit_note(sh, g, src, count, t0, URO_OUT_FORWARDED);
        return;
    }
    if (!__atomic_load_n(&sh->stop, __ATOMIC_SEQ_CST) && crit_episode_begin(sh, g, src, count, t0))
        crit_link(sh, g);
}

/* The watcher thread: waits on the epoll set of every group's sources,
 * begins their episodes, and advances those in progress when the time
 * they wait for comes. New notifications are served first, so that one
 * group's episode delays another's first action by no more than the
 * actions of the batch's notifications ahead of it. Critical: runs on
 * the locked stack, all signals blocked, no libc. */
URO_CRIT static void *crit_watcher_main(void *arg)
{
    struct uro_shared *sh = arg;
    struct epoll_event evs[64];
    int64_t next = -1;
    crit_store32(&sh->tid, (int32_t)uro_sys(SYS_gettid, 0, 0, 0, 0, 0));
    crit_store32(&sh->state, URO_STATE_WAITING);
    for (;;) {
        if (__atomic_load_n(&sh->stop, __ATOMIC_SEQ_CST) && sh->active < 0)
            break;
        long n = crit_epoll_wait(sh, evs, 64, next);
        __atomic_add_fetch(&sh->loops, 1, __ATOMIC_RELAXED);
        if (n < 0 && n != -EINTR && n != -ENOMEM)
            break;
        for (long i = 0; i < n; i++) {
            int64_t t0 = crit_now();
            uint64_t data = evs[i].data.u64;
            if (data == CRIT_CONTROL) {
                uint64_t v;
                (void)uro_sys(SYS_read, sh->control_fd, (long)&v, sizeof v, 0, 0);
                crit_control(sh);
                continue;
            }
            uint32_t index = (uint32_t)(data >> 8);
            int src = (int)(data & 255);
            struct uro_group *g = index < URO_GROUPS_MAX ? __atomic_load_n(&sh->groups[index], __ATOMIC_SEQ_CST) : 0;
            if (!g || src >= g->nsources)
                continue;
            crit_source(sh, g, src, evs[i].events, t0);
        }
        next = crit_tick(sh, 0);
        crit_store32(&sh->state, sh->active >= 0 ? URO_STATE_EPISODE : URO_STATE_WAITING);
    }
    crit_store32(&sh->state, URO_STATE_STOPPED);
    return 0;
}

/* Critical: the public entry for running an episode on the calling thread. */
URO_CRIT int uro_run_episode(struct uro_shared *shared, struct uro_group *group, int src, uint64_t count)
{
    if (!shared || !group || group->index < 0)
        return -EINVAL;
    int64_t t0 = crit_now();
    if (src < 0 || src >= group->nsources || (group->sources[src].kind & URO_SRC_KIND_MASK) != URO_SRC_OOM) {
        crit_note(shared, group, src, count, t0, URO_OUT_FORWARDED);
        return 0;
    }
    int going = crit_episode_begin(shared, group, src, count, t0);
    while (going) {
        int64_t left = group->ep.wake_ns - crit_now();
        if (left > 0)
            crit_sleep(left);
        going = crit_episode_run(shared, group);
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Setup and Python-facing functions: not critical, may use libc. */

int64_t uro_monotonic_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return -errno;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int uro_eventfd_create(unsigned int initval, int nonblock)
{
    int fd = eventfd(initval, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
    return fd < 0 ? -errno : fd;
}

int uro_eventfd_read(int fd, uint64_t *value)
{
    ssize_t n = read(fd, value, sizeof *value);
    if (n < 0)
        return -errno;
    return n == sizeof *value ? 0 : -EIO;
}

int uro_eventfd_write(int fd, uint64_t value)
{
    ssize_t n = write(fd, &value, sizeof value);
    if (n < 0)
        return -errno;
    return n == sizeof value ? 0 : -EIO;
}

int uro_epoll_create(void)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int uro_epoll_add(int epfd, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev = {.events = events, .data.u64 = data};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int uro_epoll_del(int epfd, int fd)
{
    return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
}

int uro_epoll_wait(int epfd, struct uro_ready *out, int max, int64_t deadline_ns)
{
    struct epoll_event evs[16];
    if (max <= 0)
        return -EINVAL;
    if (max > 16)
        max = 16;
    int timeout_ms = -1;
    if (deadline_ns >= 0) {
        int64_t left = deadline_ns - uro_monotonic_ns();
        if (left < 0)
            left = 0;
        /* Round up: waking a little late is harmless, early means a spin. */
        int64_t ms = (left + 999999) / 1000000;
        timeout_ms = ms > 0x7fffffff ? 0x7fffffff : (int)ms;
    }
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        out[i].data = evs[i].data.u64;
        out[i].events = evs[i].events;
    }
    return n;
}

int uro_mrelease(int pidfd)
{
    long r = syscall(SYS_process_mrelease, pidfd, 0);
    return r < 0 ? -errno : (int)r;
}

int uro_wait_readable(int fd, int64_t timeout_ns)
{
    return crit_wait_readable(fd, timeout_ns);
}

static size_t page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

int uro_arena_map(size_t size, int lock, struct uro_arena *out)
{
    size_t ps = page_size();
    if (!out || size == 0)
        return -EINVAL;
    size = (size + ps - 1) & ~(ps - 1);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    out->base = p;
    out->size = size;
    out->locked = 0;
    out->lock_errno = 0;
    if (lock) {
        if (mlock(p, size) == 0)
            out->locked = size;
        else
            out->lock_errno = errno;
    }
    /* Prefault: mlock already populated the pages; touching them also does
     * it when the lock was refused, so the pages exist before any OOM. */
    for (size_t off = 0; off < size; off += ps)
        ((volatile char *)p)[off] = 0;
    return 0;
}

int uro_arena_unmap(struct uro_arena *arena)
{
    if (!arena || !arena->base)
        return 0;
    void *p = arena->base;
    arena->base = NULL;
    if (munmap(p, arena->size) != 0)
        return -errno;
    arena->locked = 0;
    return 0;
}

int uro_arena_touch(struct uro_arena *arena)
{
    if (!arena || !arena->base)
        return -EINVAL;
    size_t ps = page_size();
    for (size_t off = 0; off < arena->size; off += ps) {
        volatile char *p = (volatile char *)arena->base + off;
        *p = *p;
    }
    return 0;
}

struct lock_ctx {
    uintptr_t self;
    struct uro_text *out;
};

static int lock_segments(struct dl_phdr_info *info, size_t size, void *arg)
{
    struct lock_ctx *ctx = arg;
    size_t ps = page_size();
    int mine = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && ctx->self >= lo && ctx->self < lo + ph->p_memsz)
            mine = 1;
    }
    if (!mine)
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD)
            continue;
        uintptr_t lo = (info->dlpi_addr + ph->p_vaddr) & ~(uintptr_t)(ps - 1);
        uintptr_t hi = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz + ps - 1) & ~(uintptr_t)(ps - 1);
        ctx->out->segments++;
        ctx->out->image_size += hi - lo;
        if (mlock((void *)lo, hi - lo) == 0)
            ctx->out->locked += hi - lo;
        else if (!ctx->out->lock_errno)
            ctx->out->lock_errno = errno;
    }
    return 1;
}

int uro_lock_text(struct uro_text *out)
{
    struct lock_ctx ctx = {.self = (uintptr_t)&crit_episode_run, .out = out};
    memset(out, 0, sizeof *out);
    out->crit_start = (uintptr_t)__start_uro_crit;
    out->crit_size = (uintptr_t)__stop_uro_crit - (uintptr_t)__start_uro_crit;
    if (!dl_iterate_phdr(lock_segments, &ctx))
        return -ENOENT;
    return 0;
}

int uro_shared_init(struct uro_shared *shared, int epfd, int control_fd, int wake_fd)
{
    if (!shared || epfd < 0 || control_fd < 0)
        return -EINVAL;
    memset(shared, 0, sizeof *shared);
    shared->epfd = epfd;
    shared->control_fd = control_fd;
    shared->wake_fd = wake_fd;
    shared->active = -1;
    return uro_epoll_add(epfd, control_fd, EPOLLIN, CRIT_CONTROL);
}

int uro_group_init(struct uro_group *group)
{
    if (!group)
        return -EINVAL;
    memset(group, 0, sizeof *group);
    group->index = -1;
    for (int i = 0; i < URO_SOURCES_MAX; i++)
        group->sources[i].fd = -1;
    for (int i = 0; i < 2; i++) {
        group->plans[i].check_fd = -1;
        group->plans[i].procs_fd = -1;
    }
    group->ep.next_active = -1;
    group->ep.pick_pidfd = -1;
    group->ep.pick_index = -1;
    group->ep.wait_fd = -1;
    return 0;
}

int uro_group_add(struct uro_shared *shared, struct uro_group *group)
{
    if (!shared || !group || group->index >= 0)
        return -EINVAL;
    /* Python adds and removes groups from one thread at a time; the
     * watcher only clears entries (uro_group_remove), so a free entry
     * stays free while this looks for one. */
    int32_t n = __atomic_load_n(&shared->ngroups, __ATOMIC_SEQ_CST);
    int32_t i = 0;
    while (i < n && __atomic_load_n(&shared->groups[i], __ATOMIC_SEQ_CST))
        i++;
    if (i >= URO_GROUPS_MAX)
        return -ENOSPC;
    group->index = i;
    __atomic_store_n(&group->state, URO_GROUP_ACTIVE, __ATOMIC_SEQ_CST);
    __atomic_store_n(&shared->groups[i], group, __ATOMIC_SEQ_CST);
    if (i == n)
        __atomic_store_n(&shared->ngroups, n + 1, __ATOMIC_SEQ_CST);
    return i;
}

int uro_source_add(struct uro_shared *shared, struct uro_group *group, int fd, int kind)
{
    int what = kind & URO_SRC_KIND_MASK;
    if (!shared || !group || group->index < 0 || fd < 0 || (what != URO_SRC_OOM && what != URO_SRC_FORWARD) ||
        (kind & ~(URO_SRC_KIND_MASK | URO_SRC_PRI | URO_SRC_REREAD)) ||
        ((kind & URO_SRC_REREAD) && !(kind & URO_SRC_PRI)))
        return -EINVAL;
    int idx = group->nsources;
    if (idx >= URO_SOURCES_MAX)
        return -ENOSPC;
    group->sources[idx].fd = fd;
    group->sources[idx].kind = kind;
    group->pending[idx] = 0;
    __atomic_store_n(&group->nsources, idx + 1, __ATOMIC_SEQ_CST);
    int r = uro_epoll_add(shared->epfd, fd, (kind & URO_SRC_PRI) ? EPOLLPRI : EPOLLIN,
                          CRIT_DATA(group->index, idx));
    if (r < 0) {
        __atomic_store_n(&group->nsources, idx, __ATOMIC_SEQ_CST);
        group->sources[idx].fd = -1;
    }
    return r < 0 ? r : idx;
}

int uro_group_remove(struct uro_shared *shared, struct uro_group *group)
{
    if (!shared || !group)
        return -EINVAL;
    if (group->index < 0)
        return 0;
    int32_t state = __atomic_load_n(&shared->state, __ATOMIC_SEQ_CST);
    if (state == URO_STATE_WAITING || state == URO_STATE_EPISODE) {
        __atomic_store_n(&group->state, URO_GROUP_REMOVING, __ATOMIC_SEQ_CST);
        int r = uro_eventfd_write(shared->control_fd, 1);
        return r < 0 ? r : 1;
    }
    crit_group_detach(shared, group);
    return 0;
}

int uro_group_state(struct uro_group *group)
{
    return group ? __atomic_load_n(&group->state, __ATOMIC_SEQ_CST) : -EINVAL;
}

int uro_plan_begin(struct uro_group *group)
{
    int32_t active = __atomic_load_n(&group->active_plan, __ATOMIC_SEQ_CST);
    int32_t other = 1 - active;
    if (__atomic_load_n(&group->busy_plan, __ATOMIC_SEQ_CST) == other + 1)
        return -EBUSY;
    return other;
}

int uro_plan_commit(struct uro_group *group, int slot)
{
    if (slot != 0 && slot != 1)
        return -EINVAL;
    __atomic_store_n(&group->active_plan, slot, __ATOMIC_SEQ_CST);
    return 0;
}

uint64_t uro_ring_head(struct uro_shared *shared)
{
    return __atomic_load_n(&shared->head, __ATOMIC_ACQUIRE);
}

int uro_ring_read(struct uro_shared *shared, uint64_t seq, struct uro_event *out)
{
    if (seq == 0)
        return -EINVAL;
    uint64_t head = uro_ring_head(shared);
    if (seq > head)
        return -EAGAIN;
    if (head - seq >= URO_RING_SIZE)
        return -ESTALE;
    struct uro_event *ev = &shared->ring[(seq - 1) % URO_RING_SIZE];
    if (__atomic_load_n(&ev->seq, __ATOMIC_ACQUIRE) != seq)
        return -ESTALE;
    memcpy(out, ev, sizeof *out);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&ev->seq, __ATOMIC_ACQUIRE) != seq)
        return -ESTALE;
    out->seq = seq;
    return 0;
}

int uro_state(struct uro_shared *shared)
{
    return __atomic_load_n(&shared->state, __ATOMIC_SEQ_CST);
}

int uro_watcher_start(struct uro_watcher *w)
{
    pthread_attr_t attr;
    sigset_t all, old;
    if (!w || !w->shared || !w->stack || w->running)
        return -EINVAL;
    int r = pthread_attr_init(&attr);
    if (r)
        return -r;
    r = pthread_attr_setstack(&attr, w->stack, w->stack_size);
    if (!r) {
        /* The thread inherits this mask: no Python signal handler, no
         * async signal ever runs on the watcher. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        crit_store32(&w->shared->stop, 0);
        crit_store32(&w->shared->state, URO_STATE_IDLE);
        r = pthread_create((pthread_t *)w->thread, &attr, crit_watcher_main, w->shared);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    pthread_attr_destroy(&attr);
    if (r)
        return -r;
    w->running = 1;
    return 0;
}

int uro_dying_close(struct uro_group *group)
{
    if (!group)
        return -EINVAL;
    for (int32_t i = 0; i < group->ndying && i < 8; i++)
        close(group->dying[i]);
    group->ndying = 0;
    return 0;
}

int uro_watcher_stop(struct uro_watcher *w)
{
    if (!w || !w->running)
        return -EINVAL;
    crit_store32(&w->shared->stop, 1);
    int r = uro_eventfd_write(w->shared->control_fd, 1);
    if (r < 0)
        return r;
    r = pthread_join(*(pthread_t *)w->thread, NULL);
    if (r)
        return -r;
    w->running = 0;
    /* Removals asked for while it stopped are done here. */
    int32_t n = __atomic_load_n(&w->shared->ngroups, __ATOMIC_SEQ_CST);
    for (int32_t i = 0; i < n && i < URO_GROUPS_MAX; i++) {
        struct uro_group *g = w->shared->groups[i];
        if (g && __atomic_load_n(&g->state, __ATOMIC_SEQ_CST) == URO_GROUP_REMOVING)
            crit_group_detach(w->shared, g);
    }
    return 0;
}


/* ---------------------------------------------------------------------- */
/* Memory hardening. Setup time only. */

int uro_mlockall(int flags)
{
    int f = 0;
    if (flags & URO_MCL_CURRENT)
        f |= MCL_CURRENT;
    if (flags & URO_MCL_FUTURE)
        f |= MCL_FUTURE;
    return mlockall(f) == 0 ? 0 : -errno;
}

int uro_munlockall(void) { return munlockall() == 0 ? 0 : -errno; }

int uro_heap_reserve(size_t bytes)
{
    /* mallopt returns 1 on success, 0 on error (without errno). */
    if (!mallopt(M_TRIM_THRESHOLD, -1) || !mallopt(M_MMAP_MAX, 0) || !mallopt(M_ARENA_MAX, 1))
        return -EINVAL;
    if (bytes == 0)
        return 0;
    volatile char *p = malloc(bytes);
    if (!p)
        return -ENOMEM;
    size_t ps = page_size();
    for (size_t off = 0; off < bytes; off += ps)
        p[off] = 1;
    /* With trimming off the pages stay in the heap's top chunk. */
    free((void *)p);
    return 0;
}

__attribute__((noinline)) int uro_stack_prefault(size_t bytes)
{
    if (bytes > (size_t)64 << 20)
        return -EINVAL;
    volatile char *p = __builtin_alloca(bytes);
    size_t ps = page_size();
    for (size_t off = 0; off < bytes; off += ps)
        p[off] = 0;
    return 0;
}

int uro_pool_init(struct uro_pool *pool, size_t size, int lock)
{
    struct uro_arena arena;
    if (!pool)
        return -EINVAL;
    int r = uro_arena_map(size, lock, &arena); /* rounded, locked if allowed, prefaulted */
    if (r)
        return r;
    memset(pool, 0, sizeof *pool);
    pool->base = arena.base;
    pool->size = arena.size;
    pool->locked = arena.locked;
    pool->lock_errno = arena.lock_errno;
    return 0;
}

void *uro_pool_arena_alloc(void *ctx, size_t size)
{
    struct uro_pool *pool = ctx;
    if (pool->chunk == 0 && size > 0 && size % page_size() == 0 && size <= pool->size) {
        /* pymalloc asks for one arena size; the first request fixes it. */
        size_t n = pool->size / size;
        pool->chunk = size;
        pool->nchunks = (uint32_t)(n > 64 ? 64 : n);
    }
    if (pool->chunk && size == pool->chunk) {
        for (uint32_t i = 0; i < pool->nchunks; i++) {
            if (!(pool->used_mask & ((uint64_t)1 << i))) {
                pool->used_mask |= (uint64_t)1 << i;
                pool->served++;
                return pool->base + (size_t)i * pool->chunk;
            }
        }
    }
    pool->fallbacks++;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void uro_pool_arena_free(void *ctx, void *ptr, size_t size)
{
    struct uro_pool *pool = ctx;
    char *p = ptr;
    if (pool->chunk && p >= pool->base && p < pool->base + pool->size) {
        size_t i = (size_t)(p - pool->base) / pool->chunk;
        pool->used_mask &= ~((uint64_t)1 << i);
        return;
    }
    munmap(ptr, size);
}


/* Hooks: pausing the main thread while they run. */

static int32_t hold_armed;
static void hold_activate(int64_t deadline_ns);

static int32_t hooks_active;       /* hook runs in progress (atomic) */
/* CPython's switch interval, which bounds how long a thread that holds the
 * GIL keeps it once another asks: lowered while the hook thread waits for
 * the GIL, restored when the hooks are done. Looked up at run time (private
 * but exported); without them the interval is left alone. */
static void (*set_switch_interval)(unsigned long);
static unsigned long (*get_switch_interval)(void);
static unsigned long saved_interval;
static int interval_lowered;
static int hooks_resume_fd = -1;
static int64_t hooks_pause_until;  /* CLOCK_MONOTONIC deadline of the pause */
static int64_t pauses;

/* Runs in the main thread, with the GIL, at its next bytecode boundary. */
static int pause_main(void *arg)
{
    if (!__atomic_load_n(&hooks_active, __ATOMIC_SEQ_CST))
        return 0;
    __atomic_add_fetch(&pauses, 1, __ATOMIC_RELAXED);
    PyThreadState *ts = PyEval_SaveThread();
    for (;;) {
        int64_t left = __atomic_load_n(&hooks_pause_until, __ATOMIC_SEQ_CST) - uro_monotonic_ns();
        if (!__atomic_load_n(&hooks_active, __ATOMIC_SEQ_CST) || left <= 0)
            break;
        crit_wait_readable(__atomic_load_n(&hooks_resume_fd, __ATOMIC_SEQ_CST),
                           left < 10000000 ? left : 10000000);
    }
    PyEval_RestoreThread(ts);
    return 0;
}

int64_t uro_hooks_wait(int wake_fd, int resume_fd, int64_t pause_ns)
{
    uint64_t count = 0;
    ssize_t n;
    do {
        n = read(wake_fd, &count, sizeof count);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    /* Drain a stale resume from an earlier episode, then pause the main thread. */
    uint64_t junk;
    if (crit_wait_readable(resume_fd, 0) == 1)
        (void)!read(resume_fd, &junk, sizeof junk);
    __atomic_store_n(&hooks_resume_fd, resume_fd, __ATOMIC_SEQ_CST);
    __atomic_store_n(&hooks_pause_until, uro_monotonic_ns() + pause_ns, __ATOMIC_SEQ_CST);
    /* An armed hold starts now, before this thread asks for the GIL: the
     * other threads stop at their next event instead of competing for it. */
    if (__atomic_load_n(&hold_armed, __ATOMIC_SEQ_CST))
        hold_activate(uro_monotonic_ns() + pause_ns);
    __atomic_add_fetch(&hooks_active, 1, __ATOMIC_SEQ_CST);
    (void)Py_AddPendingCall(pause_main, NULL);
    if (set_switch_interval && get_switch_interval && !interval_lowered) {
        saved_interval = get_switch_interval();
        set_switch_interval(URO_HOOK_SWITCH_US);
        interval_lowered = 1;
    }
    return (int64_t)count;
}

int uro_hooks_init(void)
{
    set_switch_interval = (void (*)(unsigned long))dlsym(RTLD_DEFAULT, "_PyEval_SetSwitchInterval");
    get_switch_interval = (unsigned long (*)(void))dlsym(RTLD_DEFAULT, "_PyEval_GetSwitchInterval");
    return set_switch_interval && get_switch_interval;
}

int uro_hooks_done(int resume_fd)
{
    if (interval_lowered) {
        set_switch_interval(saved_interval);
        interval_lowered = 0;
    }
    if (__atomic_load_n(&hooks_active, __ATOMIC_SEQ_CST) > 0)
        __atomic_sub_fetch(&hooks_active, 1, __ATOMIC_SEQ_CST);
    return uro_eventfd_write(resume_fd, 1);
}

int64_t uro_pauses(void) { return __atomic_load_n(&pauses, __ATOMIC_RELAXED); }

int uro_heap_trim(size_t keep)
{
    return malloc_trim(keep);
}

/* Holding the other Python threads. CPython calls a thread's profile
 * function at each call and return, with the GIL held; releasing the GIL
 * there is allowed (a profiler written in Python may block). The functions
 * that set another thread's profile function and walk the thread states
 * are not in the stable ABI: they are looked up at run time, and without
 * them the hold is not offered (the main thread's pause still is). */
typedef int (*uro_tracefunc)(PyObject *, void *, int, PyObject *);
static int (*set_profile)(PyThreadState *, uro_tracefunc, PyObject *);
static PyThreadState *(*thread_head)(PyInterpreterState *);
static PyThreadState *(*thread_next)(PyThreadState *);
static int32_t hold_active;        /* threads are held at their next event (atomic) */
static int hold_fd = -1;
static int64_t hold_until, hold_stall;
#define URO_HOLD_EXEMPT_MAX 8
static uint64_t hold_exempt[URO_HOLD_EXEMPT_MAX];
static int32_t hold_nexempt;
static uint64_t hold_progress;     /* events of the exempt threads (atomic) */
static int64_t holds;

int uro_hold_init(void)
{
    set_profile = (int (*)(PyThreadState *, uro_tracefunc, PyObject *))dlsym(RTLD_DEFAULT, "_PyEval_SetProfile");
    thread_head = (PyThreadState * (*)(PyInterpreterState *)) dlsym(RTLD_DEFAULT, "PyInterpreterState_ThreadHead");
    thread_next = (PyThreadState * (*)(PyThreadState *)) dlsym(RTLD_DEFAULT, "PyThreadState_Next");
    return set_profile && thread_head && thread_next;
}

/* The profile function of every thread while the hold is armed or active.
 * Inactive, it returns at once. Active, an exempt thread (the hook thread)
 * counts its progress and goes on; any other releases the GIL and waits
 * until the hold ends, its deadline passes, or the exempt threads have made
 * no progress for hold_stall ns (the hook thread waits for something, maybe
 * a lock this thread holds): then it runs on to its next event. */
static int hold_profile(PyObject *obj, void *frame, int what, PyObject *arg)
{
    if (!__atomic_load_n(&hold_active, __ATOMIC_ACQUIRE))
        return 0;
    uint64_t self = (uint64_t)pthread_self();
    int32_t nexempt = __atomic_load_n(&hold_nexempt, __ATOMIC_ACQUIRE);
    for (int i = 0; i < nexempt; i++) {
        if (hold_exempt[i] == self) {
            __atomic_add_fetch(&hold_progress, 1, __ATOMIC_RELAXED);
            return 0;
        }
    }
    __atomic_add_fetch(&holds, 1, __ATOMIC_RELAXED);
    PyThreadState *ts = PyEval_SaveThread();
    uint64_t seen = __atomic_load_n(&hold_progress, __ATOMIC_RELAXED);
    int64_t moved = uro_monotonic_ns();
    for (;;) {
        int64_t now = uro_monotonic_ns();
        int64_t left = __atomic_load_n(&hold_until, __ATOMIC_SEQ_CST) - now;
        if (!__atomic_load_n(&hold_active, __ATOMIC_SEQ_CST) || left <= 0)
            break;
        uint64_t progress = __atomic_load_n(&hold_progress, __ATOMIC_RELAXED);
        if (progress != seen) {
            seen = progress;
            moved = now;
        } else if (now - moved >= hold_stall) {
            break;
        }
        crit_wait_readable(hold_fd, left < 1000000 ? left : 1000000);
    }
    PyEval_RestoreThread(ts);
    return 0;
}

/* Sets fn as the profile function of every thread of this interpreter;
 * returns how many. GIL held. */
static int hold_install(uro_tracefunc fn)
{
    PyThreadState *me = PyThreadState_Get();
    int n = 0;
    for (PyThreadState *ts = thread_head(PyThreadState_GetInterpreter(me)); ts; ts = thread_next(ts)) {
        if (set_profile(ts, fn, NULL) == 0)
            n++;
        else
            PyErr_Clear();
    }
    return n;
}

static int hold_available(void) { return set_profile && thread_head && thread_next; }

static int hold_set(int fd, int64_t stall_ns, const uint64_t *exempt, int nexempt)
{
    if (nexempt < 0 || nexempt > URO_HOLD_EXEMPT_MAX || fd < 0 || stall_ns <= 0)
        return -EINVAL;
    __atomic_store_n(&hold_nexempt, 0, __ATOMIC_RELEASE);
    for (int i = 0; i < nexempt; i++)
        hold_exempt[i] = exempt[i];
    __atomic_store_n(&hold_nexempt, nexempt, __ATOMIC_RELEASE);
    hold_fd = fd;
    hold_stall = stall_ns;
    return 0;
}

/* Starts holding: drains the release fd, then sets the deadline and the flag. */
static void hold_activate(int64_t deadline_ns)
{
    uint64_t junk;
    if (crit_wait_readable(hold_fd, 0) == 1)
        (void)!read(hold_fd, &junk, sizeof junk);
    __atomic_store_n(&hold_until, deadline_ns, __ATOMIC_SEQ_CST);
    __atomic_store_n(&hold_active, 1, __ATOMIC_SEQ_CST);
}

int uro_hold_arm(int release_fd, int64_t stall_ns, const uint64_t *exempt, int nexempt)
{
    if (!hold_available())
        return -ENOSYS;
    int r = hold_set(release_fd, stall_ns, exempt, nexempt);
    if (r < 0)
        return r;
    __atomic_store_n(&hold_armed, 1, __ATOMIC_SEQ_CST);
    return hold_install(hold_profile);
}

int uro_hold_disarm(void)
{
    if (!hold_available())
        return -ENOSYS;
    if (!__atomic_exchange_n(&hold_armed, 0, __ATOMIC_SEQ_CST))
        return 0;
    return __atomic_load_n(&hold_active, __ATOMIC_SEQ_CST) ? 0 : hold_install(NULL);
}

int uro_hold_begin(int release_fd, int64_t deadline_ns, int64_t stall_ns, const uint64_t *exempt, int nexempt)
{
    if (!hold_available())
        return -ENOSYS;
    int r = hold_set(release_fd, stall_ns, exempt, nexempt);
    if (r < 0)
        return r;
    hold_activate(deadline_ns);
    return hold_install(hold_profile);
}

int uro_hold_end(int release_fd)
{
    if (!hold_available())
        return -ENOSYS;
    int n = 0;
    if (__atomic_exchange_n(&hold_active, 0, __ATOMIC_SEQ_CST) && !__atomic_load_n(&hold_armed, __ATOMIC_SEQ_CST))
        n = hold_install(NULL);
    int r = uro_eventfd_write(release_fd, 1);
    return r < 0 ? r : n;
}

int uro_hold_reset(void)
{
    if (!hold_available())
        return -ENOSYS;
    __atomic_store_n(&hold_active, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&hold_armed, 0, __ATOMIC_SEQ_CST);
    return hold_install(NULL);
}

int64_t uro_holds(void) { return __atomic_load_n(&holds, __ATOMIC_RELAXED); }

int64_t uro_hooks_next(int reply_fd, int64_t reply, int hold_fd_, int wake_fd, int resume_fd, int64_t pause_ns)
{
    if (set_profile && __atomic_load_n(&hold_active, __ATOMIC_SEQ_CST))
        (void)uro_hold_end(hold_fd_);
    PyThreadState *ts = PyEval_SaveThread();
    int64_t r = 0;
    if (reply > 0) {
        (void)uro_hooks_done(resume_fd);
        r = uro_eventfd_write(reply_fd, (uint64_t)reply);
    }
    if (r >= 0)
        r = uro_hooks_wait(wake_fd, resume_fd, pause_ns);
    PyEval_RestoreThread(ts);
    return r;
}

void *uro_pool_alloc_fn(void) { return (void *)uro_pool_arena_alloc; }
void *uro_pool_free_fn(void) { return (void *)uro_pool_arena_free; }
