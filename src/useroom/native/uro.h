/* useroom native core: the declarations Python sees.
 *
 * This file is both the C header of uro.c and the cffi cdef, so it holds
 * only what cffi's parser accepts: integer #defines, structs, prototypes.
 *
 * Every function returns >= 0 on success or -errno on failure, and its
 * contract comment says whether it blocks, allocates, or is async-signal-safe.
 * Functions marked "critical" run on the OOM path: they touch only locked
 * memory and make raw system calls, never libc.
 */

#define URO_PLAN_MAX 32     /* actions in one plan */
#define URO_RING_SIZE 256   /* event records kept (of all the groups of a watcher) */
#define URO_DATA_MAX 40     /* payload bytes of a WRITE action */
#define URO_NEEDLE_MAX 24   /* bytes of the resolution needle */
#define URO_SOURCES_MAX 8   /* fds one group's sources (the watcher adds its control fd) */
#define URO_GROUPS_MAX 4096 /* groups one watcher serves */

/* Action kinds. */
#define URO_ACT_SIGNAL_PIDFD 1  /* pidfd_send_signal(fd, sig); -ESRCH if it already exited
                                 * or this action already sent it SIGKILL */
#define URO_ACT_SIGNAL_PID 2    /* kill(pid, sig) */
#define URO_ACT_WRITE 3         /* pwrite(fd, data, len, 0) */
#define URO_ACT_MRELEASE 4      /* process_mrelease(fd, 0) */
#define URO_ACT_WAKE 5          /* write 1 to the eventfd fd */
#define URO_ACT_AWAIT 6         /* wait until fd is readable, at most timeout_ns */
#define URO_ACT_CHECK 7         /* wait for resolution, at most timeout_ns */
#define URO_ACT_SIGNAL_BEST 8   /* pick the plan's candidate with the highest badness
                                 * now (see struct uro_cand) and signal it through its
                                 * pidfd; -ESRCH if no live candidate is left. The
                                 * step records the pick and its points. If a task an
                                 * earlier pick killed has not exited yet, it first
                                 * waits up to timeout_ns for it, and once it is gone
                                 * returns URO_WAITED without picking (the check after
                                 * says whether its exit ended the OOM) */
#define URO_WAITED 1            /* SIGNAL_BEST's result when it waited for a victim */

/* Action flags. */
#define URO_F_READ 1            /* AWAIT: read the eventfd counter once ready */
#define URO_F_ALWAYS 2          /* may run after the episode was resolved (a restore) */
#define URO_F_RESOLVES 4        /* success resolves the episode and closes a grant */
#define URO_F_OPENS 8           /* success opens a grant: the limit is raised until
                                 * an action with URO_F_RESOLVES succeeds */
#define URO_F_IF_CLEAR 16       /* run only if the check says the OOM is over now */
#define URO_F_SUPERSEDE 32      /* CHECK: a new notification of the source ends the
                                 * episode (superseded) instead of waiting on */
#define URO_F_SETTLES 64        /* AWAIT with READ: a counter of URO_SETTLED means the
                                 * woken thread restored the limit itself with the usage
                                 * fitting: the grant is closed, the episode resolved */
#define URO_SETTLED 2           /* what a settling waker adds to the eventfd counter */
#define URO_F_PICKED 128        /* MRELEASE, AWAIT: act on the pidfd of this episode's
                                 * last SIGNAL_BEST pick instead of fd (skipped with
                                 * -ESRCH if it picked nobody); CHECK with URO_F_EXIT:
                                 * end at that pick's exit */
#define URO_F_EXIT 256          /* CHECK: also ends, with one last check, once the
                                 * victim's pidfd (fd) is readable: it has exited */
#define URO_F_GATE 512          /* CHECK, before the kills: waits only while a task
                                 * killed before still exits or the group has room
                                 * (room_fd), else ends at once (see uro.c) */
#define URO_CANDS_MAX 32        /* candidates of one plan */
#define URO_MEMBER_MAX 512      /* bytes of a plan's membership line */
/* A signal whose task is no longer in the plan's group (moved out, or the
 * group is gone) is not sent: its step's result is -EXDEV (or the errno of
 * the read of its /proc/<pid>/cgroup, if that failed). */

/* Source kinds: what the watcher does when a source's eventfd fires. */
#define URO_SRC_OOM 1           /* run the armed plan */
#define URO_SRC_FORWARD 2       /* record the event and wake Python */
/* Source flags, or'ed into the kind: how the source's fd signals. Without
 * them it is an eventfd (EPOLLIN, its counter read). */
#define URO_SRC_KIND_MASK 255
#define URO_SRC_PRI 256         /* wait for EPOLLPRI: a cgroup v2 file change
                                 * (memory.events) or a PSI trigger; count 1 */
#define URO_SRC_REREAD 512      /* with PRI: pread the file from offset 0 after
                                 * each wakeup, which re-arms a kernfs change
                                 * notification; ENODEV: the group is gone
                                 * (removal itself does not signal the file) */

/* Outcomes of an event record. */
#define URO_OUT_RESOLVED 1      /* the check saw the OOM resolved */
#define URO_OUT_UNRESOLVED 2    /* the plan ran out and the group is still under OOM */
#define URO_OUT_NOT_NEEDED 3    /* the group was no longer under OOM when the episode began */
#define URO_OUT_GONE 4          /* the check file is gone: the group was removed */
#define URO_OUT_NO_PLAN 5       /* no plan was armed */
#define URO_OUT_ACTED 6         /* the plan ran and there is no check to confirm it */
#define URO_OUT_FORWARDED 7     /* a forward source fired; Python decides */
#define URO_OUT_RELIEVED 8      /* no task waits any more, but a grant is still open:
                                 * the limit is raised by at most the reserve */
#define URO_OUT_SUPERSEDED 9    /* while a check waited, the group ran out again: the
                                 * action took effect (the OOM lock changed hands) and
                                 * the next notification starts a new episode */

/* Watcher states. */
#define URO_STATE_IDLE 0
#define URO_STATE_WAITING 1
#define URO_STATE_EPISODE 2     /* an episode of one of its groups is in progress */
#define URO_STATE_STOPPED 3

/* Group slot states. */
#define URO_GROUP_FREE 0        /* not in a watcher's table (the memory is Python's) */
#define URO_GROUP_ACTIVE 1      /* in the table: its sources are waited on */
#define URO_GROUP_REMOVING 2    /* Python asked the watcher to take it out */

/* What the action of an episode in progress waits for (struct uro_episode). */
#define URO_WAIT_NONE 0
#define URO_WAIT_CHECK 1        /* CHECK: the resolution, an exit or a new notification */
#define URO_WAIT_DYING 2        /* SIGNAL_BEST: the exit of the group's last victims */
#define URO_WAIT_FD 3           /* AWAIT: its fd readable */

struct uro_action {
    int32_t kind;
    int32_t fd;
    int32_t pid;
    int32_t sig;
    int32_t flags;
    int32_t guard;           /* run only if the action at this index ran and succeeded; -1: no guard */
    uint32_t len;
    int32_t fired;           /* set by the watcher once a SIGKILL went out: not sent twice */
    int32_t member_fd;       /* SIGNAL_*: /proc/<pid>/cgroup of the task, opened and read
                              * once ahead, which says at the signal whether it is still
                              * in the group; -1: that file is read anew by pid */
    int32_t pad;
    int64_t timeout_ns;
    char data[40];
};

/* A task SIGNAL_BEST may pick. Its badness is computed at the OOM as the
 * kernel's oom_badness() does: resident pages (VmRSS) + swapped-out pages
 * (VmSwap) + page-table pages (VmPTE), read from /proc/<pid>/status through
 * status_fd (opened and read once ahead, so that the seq_file buffer exists
 * and a pread at offset 0 regenerates the text without allocating in user
 * space), plus oom_score_adj scaled to the group's limit (adj_kb), all in kB. */
struct uro_cand {
    int32_t pidfd;
    int32_t status_fd;
    int32_t pid;
    int32_t fired;           /* set by the watcher once it sent SIGKILL: not picked again */
    int64_t adj_kb;
    int32_t adj_fd;          /* /proc/<pid>/oom_score_adj opened ahead (a pread at 0
                              * formats it anew, allocating nothing), read at the
                              * pick; -1: none, adj_kb stands */
    int32_t cgroup_fd;       /* /proc/<pid>/cgroup opened and read ahead: whether the
                              * task is still in the group at the pick; -1: read anew */
};

struct uro_plan {
    uint64_t id;             /* chosen by Python; copied into each record */
    uint32_t count;
    int32_t check_fd;        /* file whose contents say whether the OOM is over; -1: none */
    uint32_t needle_len;
    char needle[24];         /* resolved when the check file contains these bytes */
    int64_t poll_ns;         /* interval between reads of check_fd */
    struct uro_action actions[32];
    int64_t below;           /* > 0: check_fd holds a number (v2 memory.current) and
                              * the episode is resolved when it is below this; the
                              * needle is then unused */
    uint32_t ncands;
    int32_t procs_reopen;    /* 1: read procs_fd through a new open of /proc/self/fd/N at
                              * each pick (cgroup v1 lists a file's first read again) */
    struct uro_cand cands[32]; /* in the order ties go to the later one, as the
                              * kernel's scan does (the oldest task first) */
    /* Tasks that are not candidates (started since the candidates were
     * listed) are found by SIGNAL_BEST through procs_fd, the group's
     * cgroup.procs (-1: not looked for): their status and oom_score_adj are
     * opened and read at the pick, and adj scaled by limit_kb. The pids of
     * protect are never picked (the handler, its watchdog, the user's, and
     * tasks already killed). */
    int32_t procs_fd;
    uint32_t nprotect;
    int64_t limit_kb;
    int32_t protect[32];
    /* The group's line in /proc/<pid>/cgroup ("7:memory:/a/b\n" on v1,
     * "0::/a/b\n" on v2): a task is signalled only if its file holds this
     * line when the signal goes out. A pidfd pins a process against pid
     * reuse, not against a move to another group. 0: no check. */
    uint32_t member_len;
    int32_t pad2;
    char member[URO_MEMBER_MAX];
    /* cgroup v1: the group's usage file (memory.usage_in_bytes) opened and
     * read ahead, and the usage below which the group has room for one
     * more page under its limit (-1, 0: not looked at): the gate before
     * the kills (URO_F_GATE) waits while the group has that room (see
     * crit_room). */
    int32_t room_fd;
    int32_t pad3;
    int64_t room_below;
};

struct uro_step {
    int64_t t0_ns;           /* CLOCK_MONOTONIC when the action began */
    int64_t t_ns;            /* CLOCK_MONOTONIC when the action returned */
    int32_t index;           /* of the action in the plan */
    int32_t kind;
    int32_t result;          /* >= 0, or -errno */
    int32_t pick;            /* SIGNAL_BEST: the candidate picked, else -1 */
    int64_t points;          /* SIGNAL_BEST: its badness (kB) at the pick */
    int32_t pid;             /* SIGNAL_BEST: the pid picked (a candidate's, or one
                              * found through procs_fd with pick -1), else 0 */
    int32_t pad;
};

struct uro_event {
    uint64_t seq;            /* 1, 2, ...; 0 while the record is being written */
    int32_t group;           /* index of the group in the watcher's table */
    int32_t pad;
    uint64_t episode;        /* the group's episode number (1, 2, ...); 0: no episode */
    int32_t source;          /* index of the group's source that fired */
    int32_t outcome;         /* URO_OUT_* */
    uint64_t count;          /* the eventfd counter that was read */
    int64_t notified_ns;     /* the watcher read the notification */
    int64_t acted_ns;        /* the first action began; 0 if none ran */
    int64_t resolved_ns;     /* the OOM was seen over (or superseded); 0 if not seen */
    uint64_t plan_id;        /* the id of the plan that ran; 0 if none */
    int32_t plan_slot;
    int32_t nsteps;
    struct uro_step steps[32];
};

struct uro_source {
    int32_t fd;
    int32_t kind;
};

/* An episode in progress. The watcher runs the actions of its plan one
 * after the other until one has to wait (for the OOM to end, for a victim
 * to exit, for the hooks' reply); it then records what it waits for and
 * when it must look again, and serves the other groups meanwhile. All of
 * it is the watcher's; Python reads active and rec.episode only. */
struct uro_episode {
    int32_t active;          /* 1 while the episode runs (atomic) */
    int32_t wait;            /* URO_WAIT_*: what the action at next waits for */
    uint32_t next;           /* the action in progress, or the next one */
    int32_t slot;            /* the plan slot claimed */
    int32_t has_check;
    int32_t outcome;         /* URO_OUT_* once known, else 0 */
    int32_t acted_since_check;
    int32_t grant_open;      /* a raised limit waits for its restore */
    uint64_t ran;            /* bit i: action i ran and succeeded */
    int64_t t0_ns;           /* the action in progress began */
    int64_t deadline_ns;     /* its wait ends */
    int64_t wake_ns;         /* the watcher looks at the episode again then */
    int32_t wait_fd;         /* URO_WAIT_FD: the fd; CHECK: the exit fd (-1: none) */
    int32_t supersede;       /* CHECK: a new notification of the source ends it */
    int32_t gone;            /* CHECK: the exit fd was seen readable */
    int32_t next_active;     /* the next group with an episode in progress, -1: none */
    int32_t pick_index;      /* the last SIGNAL_BEST pick: its candidate, or -1 */
    int32_t pick_pid;
    int32_t pick_pidfd;      /* -1: nobody picked */
    int32_t pick_owned;      /* pick_pidfd was opened by the pick: the episode closes it */
    int32_t gate;            /* CHECK: the gate before the kills (URO_F_GATE) */
    int32_t pad_gate;
    int64_t pick_points;
    struct uro_event rec;    /* the record being written, copied to the ring at the end */
};

/* One group a watcher serves: its sources, its two plan slots (one armed,
 * one Python fills), the victims it killed that are still exiting, and its
 * episode in progress. Each lives in a locked mapping of its own, so that
 * a group can be added and removed while the watcher runs. */
struct uro_group {
    int32_t index;           /* in the watcher's table; -1 while not in one */
    int32_t state;           /* URO_GROUP_* (atomic) */
    int32_t active_plan;     /* 0 or 1 (atomic) */
    int32_t busy_plan;       /* slot + 1 while an episode reads it, else 0 (atomic) */
    int32_t nsources;
    int32_t ndying;
    uint64_t episodes;       /* episodes begun (atomic) */
    struct uro_source sources[8];
    /* Notifications read while an episode ran: each OOM source's count
     * starts the next episode once this one ends (or supersedes it at a
     * CHECK); a forward source's is recorded then. */
    uint64_t pending[8];
    /* Pidfds (the watcher's own: dups, or opened by a pick) of the tasks
     * SIGNAL_BEST killed that may not have exited yet. The next pick waits
     * for them first, as the kernel waits for its own victim, and closes
     * each once it has exited. */
    int32_t dying[8];
    struct uro_plan plans[2];
    struct uro_episode ep;
};

/* Everything the watcher thread touches lives in locked memory: this
 * struct (its own arena) and the groups (theirs). Python adds groups and
 * writes their plans and sources; the watcher writes the ring. */
struct uro_shared {
    int32_t state;           /* URO_STATE_* (atomic) */
    int32_t stop;            /* 1: end once no episode is in progress (atomic) */
    int32_t epfd;
    int32_t control_fd;      /* eventfd: a write wakes the watcher to stop or remove groups */
    int32_t wake_fd;         /* eventfd the watcher writes after each record; -1: none */
    int32_t tid;             /* the watcher thread's id once it runs, else 0 (atomic) */
    int32_t ngroups;         /* table entries in use (the highest index + 1) */
    int32_t active;          /* the first group with an episode in progress, -1: none */
    int32_t nactive;         /* episodes in progress (atomic) */
    int32_t no_pwait2;       /* epoll_pwait2 is missing: waits round up to milliseconds */
    uint64_t head;           /* seq of the newest complete record (atomic) */
    uint64_t loops;          /* wake-ups of the watcher (atomic), a heartbeat */
    struct uro_event ring[256];
    struct uro_group *groups[4096];
};

struct uro_ready {
    uint64_t data;
    uint32_t events;
};

struct uro_arena {
    void *base;
    size_t size;
    size_t locked;           /* bytes locked by mlock */
    int32_t lock_errno;      /* why mlock failed, 0 if it did not */
};

struct uro_text {
    size_t crit_start;       /* address of the critical code section */
    size_t crit_size;        /* its size in bytes */
    size_t image_size;       /* bytes of this module's loaded segments, in pages */
    size_t locked;           /* bytes mlocked */
    int32_t segments;        /* loaded segments found */
    int32_t lock_errno;      /* why an mlock failed, 0 if none did */
};

struct uro_watcher {
    struct uro_shared *shared;
    void *stack;
    size_t stack_size;
    int32_t running;
    unsigned char thread[64]; /* pthread_t, opaque */
};

/* Non-blocking, allocation-free, async-signal-safe. */
int64_t uro_monotonic_ns(void);

/* Non-blocking, allocation-free (the kernel object is the caller's to close). */
int uro_eventfd_create(unsigned int initval, int nonblock);
/* Blocks unless the fd is non-blocking; allocation-free, async-signal-safe. */
int uro_eventfd_read(int fd, uint64_t *value);
/* Non-blocking for counters far from overflow; allocation-free, async-signal-safe. */
int uro_eventfd_write(int fd, uint64_t value);

/* Non-blocking, allocation-free in user space. */
int uro_epoll_create(void);
int uro_epoll_add(int epfd, int fd, uint32_t events, uint64_t data);
int uro_epoll_del(int epfd, int fd);
/* Blocks until a fd is ready or the absolute CLOCK_MONOTONIC deadline
 * (-1: none) passes; returns the number ready, 0 on timeout, -EINTR when
 * interrupted (the caller retries; the timeout is recomputed from the
 * deadline). Allocation-free. */
int uro_epoll_wait(int epfd, struct uro_ready *out, int max, int64_t deadline_ns);
/* Blocks up to timeout_ns (-1: forever) for fd to become readable; 1 ready,
 * 0 timeout, -errno. Allocation-free. */
int uro_wait_readable(int fd, int64_t timeout_ns);

/* Maps size bytes (rounded up to pages), prefaults them and, if lock, mlocks
 * them. A refused mlock is reported in out->lock_errno, not as failure.
 * Non-blocking; the mapping is the caller's to unmap. */
int uro_arena_map(size_t size, int lock, struct uro_arena *out);
int uro_arena_unmap(struct uro_arena *arena);
/* Writes every page of the arena again (the same bytes), in the parent
 * right after a fork. A fork makes every private page copy-on-write, the
 * locked ones included, for as long as the child shares them: the parent's
 * next write to one copies it, which needs a new page, charged to the
 * group; at the limit that write would sleep in the OOM wait. The watcher
 * must never fault, so its arena (its data and its stack) is copied now.
 * It cannot be kept out of the child instead (MADV_DONTFORK): glibc keeps
 * the thread's descriptor at the top of a stack it was given, and walks it
 * in the child. Non-blocking; returns 0 or -errno. */
int uro_arena_touch(struct uro_arena *arena);

/* mlocks every loaded segment of this module (code, constants, data): the
 * critical code may read constants and jump tables outside its own section.
 * Non-blocking, allocation-free. */
int uro_lock_text(struct uro_text *out);

/* Prepares shared for a watcher: zeroed, no group; control_fd joins the
 * epoll set. Takes ownership of no fd. Non-blocking, allocation-free. */
int uro_shared_init(struct uro_shared *shared, int epfd, int control_fd, int wake_fd);
/* Prepares a group's memory (zeroed, fds -1, no plan). Non-blocking. */
int uro_group_init(struct uro_group *group);
/* Puts group in the watcher's table; returns its index, -ENOSPC if the
 * table is full. Safe while the watcher runs. Non-blocking. */
int uro_group_add(struct uro_shared *shared, struct uro_group *group);
/* Adds a source to group: its fd joins the epoll set. Safe while the
 * watcher runs. Returns the source index (per group). Non-blocking. */
int uro_source_add(struct uro_shared *shared, struct uro_group *group, int fd, int kind);
/* Takes group out of the table. With the watcher running, asks it to
 * (it ends an episode in progress first, recording it UNRESOLVED) and
 * returns 1: the memory is free once uro_group_state() is URO_GROUP_FREE.
 * Otherwise does it now and returns 0. Non-blocking. */
int uro_group_remove(struct uro_shared *shared, struct uro_group *group);
int uro_group_state(struct uro_group *group);
/* Returns the plan slot of group Python may fill now, or -EBUSY while the
 * watcher is reading it (retry shortly). Non-blocking, allocation-free. */
int uro_plan_begin(struct uro_group *group);
/* Makes slot the armed plan; the next episode uses it. Non-blocking. */
int uro_plan_commit(struct uro_group *group, int slot);
/* Copies the record with sequence number seq into out. -EAGAIN if it is not
 * written yet, -ESTALE if it was overwritten. Non-blocking, allocation-free. */
int uro_ring_read(struct uro_shared *shared, uint64_t seq, struct uro_event *out);
uint64_t uro_ring_head(struct uro_shared *shared);
int uro_state(struct uro_shared *shared);

/* Starts the watcher thread on the given (locked) stack with every signal
 * blocked. Allocates inside libc (thread setup); never on the OOM path. */
int uro_watcher_start(struct uro_watcher *w);
/* Asks the watcher to stop once no episode is in progress, and joins it.
 * Blocks until it exits. */
int uro_watcher_stop(struct uro_watcher *w);

/* Closes the pidfds of group's victims the watcher was still waiting for;
 * after the watcher stopped (or never ran), or once the group is out of
 * its table. Non-blocking. */
int uro_dying_close(struct uro_group *group);

/* Runs one episode of group's armed plan on the calling thread, exactly as
 * the watcher would for source index src, to its end; for tests and for
 * an in-thread fallback (never while the watcher runs). Blocking (it
 * sleeps while an action waits), allocation-free, critical. */
int uro_run_episode(struct uro_shared *shared, struct uro_group *group, int src, uint64_t count);

/* 1 if the critical path uses raw syscall instructions, 0 if libc's syscall(). */
int uro_raw_syscalls(void);

/* process_mrelease(pidfd, 0): reaps a killed process's memory now.
 * -ENOSYS before Linux 5.15. Blocking while it reaps; allocation-free. */
int uro_mrelease(int pidfd);

/* ---- Memory hardening ---- */

#define URO_MCL_CURRENT 1
#define URO_MCL_FUTURE 2

/* mlockall(flags); -ENOMEM/-EPERM when RLIMIT_MEMLOCK or the lack of
 * CAP_IPC_LOCK refuse it. Non-blocking. */
int uro_mlockall(int flags);
int uro_munlockall(void);

/* Makes glibc keep the heap: never trim it, never serve large blocks from
 * fresh mmaps, one malloc arena for all threads; then grows the heap by
 * bytes and touches it, so later mallocs reuse resident pages. Allocates
 * (that is its point); not for the OOM path. Returns 0 or -errno. */
int uro_heap_reserve(size_t bytes);

/* The hook thread's wait. Blocks (call it without the GIL) until wake_fd
 * is readable and reads it; then lowers CPython's switch interval (so the
 * thread holding the GIL gives it up within microseconds, not milliseconds)
 * and asks the main thread, through a pending call, to release the GIL and
 * pause until uro_hooks_done() or until pause_ns have passed: a thread that
 * allocates while it holds the GIL could otherwise use up the granted
 * headroom before the hooks get the GIL.
 * Returns the eventfd counter or -errno. Allocation-free. */
int64_t uro_hooks_wait(int wake_fd, int resume_fd, int64_t pause_ns);
/* Ends the pause of uro_hooks_wait. Non-blocking, allocation-free. */
int uro_hooks_done(int resume_fd);
/* The switch interval (microseconds) while the hook thread waits for the GIL. */
#define URO_HOOK_SWITCH_US 50
/* Finds CPython's switch-interval setters; 1 if found. Setup time. */
int uro_hooks_init(void);
/* Pending calls requested and pauses taken by the main thread so far. */
int64_t uro_pauses(void);

/* Returns the heap's free pages to the kernel (malloc_trim(0), every arena):
 * memory a hook freed must reach the kernel for the group's usage to drop.
 * The top keep bytes of the main heap stay. Returns 1 if memory was
 * released. Called through a handle that keeps the GIL (ctypes.PyDLL), so
 * that no other Python thread refills the heap while it runs. Not for the
 * OOM path. */
int uro_heap_trim(size_t keep);

/* Holding the process's other Python threads while the hooks run.
 *
 * A held thread, at its next call or return event (CPython calls a thread's
 * profile function there, with the GIL held), releases the GIL and waits
 * until the hold ends, until its deadline (CLOCK_MONOTONIC), or until the
 * exempt threads (the hook thread, by pthread id) have made no progress for
 * stall_ns: the hook thread may wait for a lock the held thread owns, which
 * then runs on to its next event.
 *
 * uro_hold_arm installs the profile function on every thread ahead of an
 * episode (it returns at once while no hold is active; the interpreter runs
 * slower while one is installed); uro_hooks_wait then starts the hold the
 * moment the hooks are woken, without the GIL, so the service's threads stop
 * at their next event instead of competing with the hook thread for the GIL.
 * uro_hold_begin installs and starts it at once (a hold that was not armed,
 * or threads started since). uro_hold_end stops it, and removes the profile
 * functions unless the hold is armed; uro_hold_disarm removes them.
 * All but uro_hold_init need the GIL (call them through ctypes.PyDLL), return
 * how many threads they changed or -errno (-ENOSYS: the interpreter lacks
 * the functions; see uro_hold_init), and do not allocate. */
int uro_hold_init(void);
int uro_hold_arm(int release_fd, int64_t stall_ns, const uint64_t *exempt, int nexempt);
int uro_hold_disarm(void);
int uro_hold_begin(int release_fd, int64_t deadline_ns, int64_t stall_ns, const uint64_t *exempt, int nexempt);
int uro_hold_end(int release_fd);
/* In a child after fork (GIL held): no hold, armed or active, and no
 * profile function left on the one thread the child has. */
int uro_hold_reset(void);
/* Times a thread was held so far. */
int64_t uro_holds(void);

/* The hook thread between two episodes, in one call so that it never needs
 * the GIL between its reply and its next wake-up (a thread of the service
 * could fault at the limit with the GIL held meanwhile). Called with the
 * GIL held (ctypes.PyDLL): ends the hold (hold_fd) if one is active, then
 * releases the GIL; if reply > 0, ends the main thread's pause
 * (uro_hooks_done) and adds reply to reply_fd (1, or URO_SETTLED); then
 * waits as uro_hooks_wait does (the switch interval lowered before it asks
 * for the GIL back), and returns its result. Allocation-free; blocks. */
int64_t uro_hooks_next(int reply_fd, int64_t reply, int hold_fd, int wake_fd, int resume_fd, int64_t pause_ns);

/* Touches bytes of the calling thread's stack below the current frame so the
 * pages exist before an OOM. Non-blocking, allocation-free. */
int uro_stack_prefault(size_t bytes);

/* A pool of prefaulted (and, if allowed, locked) chunks that pymalloc takes
 * its arenas from (PyObject_SetArenaAllocator, called from Python with these
 * two functions and the pool as ctx). Requests of another size, or beyond the
 * pool, fall back to mmap; free() gives pool chunks back and munmaps the
 * rest. Called with the GIL held. */
struct uro_pool {
    char *base;
    size_t size;             /* bytes mapped */
    size_t chunk;            /* bytes per chunk: pymalloc's arena size, set by its first request */
    size_t locked;
    int32_t lock_errno;
    uint32_t nchunks;
    uint64_t used_mask;      /* bit i: chunk i handed out */
    uint64_t served;         /* arenas served from the pool */
    uint64_t fallbacks;      /* arenas served by mmap */
};
int uro_pool_init(struct uro_pool *pool, size_t size, int lock);
void *uro_pool_arena_alloc(void *ctx, size_t size);
void uro_pool_arena_free(void *ctx, void *ptr, size_t size);
/* The functions' addresses, for PyObject_SetArenaAllocator. */
void *uro_pool_alloc_fn(void);
void *uro_pool_free_fn(void);
