/*
 * kuasar-pause: the pod process. It holds the pod's namespaces and sleeps; as PID 1 of a pod-wide PID
 * namespace it reaps the orphans that re-parent to it.
 *
 * Usage:
 *   kuasar-pause [NAME]
 *       Already in the pod's namespaces: just hold them.
 *   kuasar-pause --setup [--owner PATH] [--oom-score-adj N] [--netns PATH [--userns]] [--ipc] [--uts]
 *                [--hostname NAME] [--pid] [--sysctl PATH=VALUE]... NAME
 *       The task server spawns us directly (posix_spawn: no fork of a Python heap, whose copy-on-write
 *       faults cost milliseconds on both sides): start a session, set our OOM score adjustment (where
 *       we may: lowering it needs privilege in the host's user namespace, so it comes first), join the
 *       netns (with --userns first the user namespace that owns it, so that the namespaces made next
 *       belong to that one too), unshare IPC/UTS (and PID, forking once so the child is PID 1), set the
 *       hostname and the sysctls (/proc/sys serves the writer's own namespaces: these are the pod's
 *       now), then write our host pid in decimal to stdout and close it. Any failure writes
 *       "!<what>: <error>" instead and exits 1. A sysctl comes as its path under /proc/sys, which
 *       the task server has made from its name (a dot in that path is literal: eth0.100) and checked.
 *
 * --owner names the pod's directory of the task server that spawned us. Unused here: it stays in our
 * command line (and our PID 1 child's), where a task server started after that one died finds a pod
 * process whose record was never written.
 *
 * NAME (at most 15 bytes) becomes the process's comm. setup builds this file from the same tree as
 * kuasar.common.pod_holder, which calls it, so the two always agree on these arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* <linux/nsfs.h>'s request, spelled here: musl's headers do not include the kernel's. */
#ifndef NS_GET_USERNS
#define NS_GET_USERNS _IO(0xb7, 0x1)
#endif

static void fail(const char *what) {
    char msg[256];
    int len = snprintf(msg, sizeof msg, "!%s: %s", what, strerror(errno));
    if (len > 0)
        (void)!write(STDOUT_FILENO, msg, (size_t)len < sizeof msg ? (size_t)len : sizeof msg - 1);
    _exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: kuasar-pause [--setup [--owner PATH] [--oom-score-adj N] [--netns PATH [--userns]] [--ipc] "
                    "[--uts] [--hostname NAME] [--pid] [--sysctl PATH=VALUE]...] [NAME]\n");
    _exit(2);
}

/* More than any pod sets (kubelet's safe sysctls are a dozen); it bounds the array below. */
#define MAX_SYSCTLS 128

/* PATH=VALUE -> /proc/sys/PATH. */
static void write_sysctl(const char *setting) {
    char path[512], what[160];
    const char *eq = strchr(setting, '=');
    size_t key_len, len;
    int fd;

    if (eq == NULL || eq == setting || (key_len = (size_t)(eq - setting)) >= sizeof path - 10) {
        errno = EINVAL;
        fail("sysctl");
    }
    memcpy(path, "/proc/sys/", 10);
    memcpy(path + 10, setting, key_len);
    path[10 + key_len] = '\0';
    snprintf(what, sizeof what, "sysctl %.*s", (int)key_len, setting);
    fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        fail(what);
    len = strlen(eq + 1);
    if (write(fd, eq + 1, len) != (ssize_t)len)
        fail(what);
    close(fd);
}

/* Join the user namespace that owns the network namespace `netns_fd` (containerd makes a pod's netns
 * inside the pod's user namespace, with its id mappings). Ours owning it means there is none to join. */
static void join_owner_userns(int netns_fd) {
    struct stat owner, own;
    int fd = ioctl(netns_fd, NS_GET_USERNS);

    if (fd < 0)
        fail("netns owner");
    if (fstat(fd, &owner) < 0 || stat("/proc/self/ns/user", &own) < 0)
        fail("stat user namespace");
    if (owner.st_ino == own.st_ino && owner.st_dev == own.st_dev) {
        errno = EINVAL;
        fail("netns belongs to the host's user namespace, not the pod's");
    }
    if (setns(fd, CLONE_NEWUSER) < 0)
        fail("setns user");
    close(fd);
}

/* Best effort, as containerd's restricted mode: where we may not lower it, the inherited value stays. */
static void set_oom_score_adj(const char *value) {
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);

    if (fd < 0)
        return;
    (void)!write(fd, value, strlen(value));
    close(fd);
}

/* Enter or make the pod's namespaces, report our host pid on stdout; returns in the pod process. */
static void setup(const char *oom_score_adj, const char *netns, int userns, int flags,
                  const char *hostname, int new_pid, const char **sysctls, int n_sysctls) {
    char self[32];
    ssize_t n;
    int fd;

    if (setsid() < 0)
        fail("setsid");
    if (oom_score_adj != NULL)
        set_oom_score_adj(oom_score_adj);
    if (netns != NULL) {
        fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail("open netns");
        if (userns)
            join_owner_userns(fd);
        if (setns(fd, CLONE_NEWNET) < 0)
            fail("setns net");
        close(fd);
    }
    if (flags != 0 && unshare(flags) < 0)
        fail("unshare");
    if (hostname != NULL && sethostname(hostname, strlen(hostname)) < 0)
        fail("sethostname");
    for (int i = 0; i < n_sysctls; i++)
        write_sysctl(sysctls[i]);
    if (new_pid) {
        pid_t child = fork();
        if (child < 0)
            fail("fork");
        if (child > 0)
            _exit(0); /* the child is PID 1 of the pod's PID namespace and re-parents to the task server */
    }
    /* In a new PID namespace getpid() says 1; /proc is still the host's, so /proc/self names our host pid. */
    n = readlink("/proc/self", self, sizeof self - 1);
    if (n <= 0)
        fail("readlink /proc/self");
    if (write(STDOUT_FILENO, self, (size_t)n) != n)
        _exit(1); /* the task server is gone: nobody will ever use this pod */
    fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        dup2(fd, STDOUT_FILENO); /* the report pipe's end-of-file tells the task server we are done */
        close(fd);
    } else {
        close(STDOUT_FILENO);
    }
}

static void sleep_forever(void) {
    sigset_t wanted;
    int sig;

    sigemptyset(&wanted);
    sigaddset(&wanted, SIGCHLD);
    sigprocmask(SIG_BLOCK, &wanted, NULL);
    if (getpid() != 1) {
        /* Not an init: nothing to reap; default dispositions (SIGTERM/SIGKILL) end us. */
        for (;;)
            pause();
    }
    /* PID 1 ignores signals without handlers; the pod is stopped with SIGKILL from outside. */
    for (;;) {
        if (sigwait(&wanted, &sig) != 0)
            continue;
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
}

int main(int argc, char **argv) {
    const char *netns = NULL, *hostname = NULL, *name = NULL, *oom_score_adj = NULL, *owner = NULL;
    int flags = 0, new_pid = 0, do_setup = 0, userns = 0, n_sysctls = 0;
    const char *sysctls[MAX_SYSCTLS];

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--setup") == 0)
            do_setup = 1;
        else if (strcmp(argv[i], "--netns") == 0 && i + 1 < argc)
            netns = argv[++i];
        else if (strcmp(argv[i], "--owner") == 0 && i + 1 < argc)
            owner = argv[++i];
        else if (strcmp(argv[i], "--oom-score-adj") == 0 && i + 1 < argc)
            oom_score_adj = argv[++i];
        else if (strcmp(argv[i], "--hostname") == 0 && i + 1 < argc)
            hostname = argv[++i];
        else if (strcmp(argv[i], "--sysctl") == 0 && i + 1 < argc) {
            if (n_sysctls == MAX_SYSCTLS)
                usage();  /* not dropped: one more would be read as NAME */
            sysctls[n_sysctls++] = argv[++i];
        }
        else if (strcmp(argv[i], "--userns") == 0)
            userns = 1;
        else if (strcmp(argv[i], "--ipc") == 0)
            flags |= CLONE_NEWIPC;
        else if (strcmp(argv[i], "--uts") == 0)
            flags |= CLONE_NEWUTS;
        else if (strcmp(argv[i], "--pid") == 0)
            new_pid = 1;
        else if (argv[i][0] == '-' || name != NULL)
            usage();
        else
            name = argv[i];
    }
    if ((!do_setup && (netns || hostname || flags || new_pid || n_sysctls || oom_score_adj || owner))
        || (userns && netns == NULL))
        usage();
    if (new_pid)
        flags |= CLONE_NEWPID;
    if (name != NULL)
        prctl(PR_SET_NAME, name, 0, 0, 0);
    if (do_setup)
        setup(oom_score_adj, netns, userns, flags, hostname, new_pid, sysctls, n_sysctls);
    sleep_forever();
    return 0;
}
