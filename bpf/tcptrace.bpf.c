/* SPDX-License-Identifier: MIT */
/*
 * tcptrace kernel side, compiled by bcc.
 *
 * Reads the fields of the tracepoint sock:inet_sock_set_state, never struct
 * sock at an offset from the headers: the kernel headers on the build machine
 * need not match the running kernel (the few struct reads use offsets from the
 * running kernel's BTF). Filters run here so that other traffic costs nothing;
 * statistics are kept here so that they stay exact when the perf buffer
 * overflows.
 *
 * Compile-time knobs (-D from tcptrace/loader.py):
 *   MAX_SOCKETS     capacity of the per-socket LRU map
 *   FILTER_FAMILY   0, or AF_INET/AF_INET6 to keep only that family
 *   FILTER_PORTS    bitmask of PORT_ANY/PORT_LOCAL/PORT_REMOTE checks to apply
 *   SHOW_STATES     bitmask of states: emit transitions into or out of them
 *   EMIT_EVENTS     0 for summary-only mode (no per-event stream)
 *   MAX_CPUS        possible CPUs (size of the consumed map)
 *   SHED_LAG        0, or how many unread events a CPU's perf ring may hold
 *                   before new ones are shed (counted, not submitted)
 *   SK_NET_OFFSET, NET_INUM_OFFSET
 *                   where a socket's network namespace inode is: the struct
 *                   net pointer at sk + SK_NET_OFFSET, the inode at net +
 *                   NET_INUM_OFFSET; from the running kernel's BTF
 *                   (tcptrace/btf.py), -1 when unknown (then netns stays 0)
 *   SELF_PID        tcptrace's own pid: its check socket is never traced
 *   NESTED          1: a raw-tracepoint program handles the transitions the
 *                   kernel did not run the tracepoint program for (it does not
 *                   while a BPF program runs on the CPU, for example this one
 *                   interrupted by a softirq); it reads struct sock at the
 *                   offsets below, from the running kernel's BTF and checked
 *                   by user space on a connection of its own
 *   SK_FAMILY_OFFSET, SK_PROTOCOL_OFFSET, SK_DPORT_OFFSET, SK_DADDR_OFFSET,
 *   SK_V6_SADDR_OFFSET, SK_V6_DADDR_OFFSET, INET_SPORT_OFFSET, INET_SADDR_OFFSET
 *                   where the tracepoint's fields come from in struct sock and
 *                   struct inet_sock (with NESTED)
 *   SK_PPREV_OFFSET, SK_FLAGS_OFFSET, SOCK_DONE_BIT
 *                   where to tell, at FIN_WAIT2/CLOSING -> CLOSE, whether a
 *                   timewait socket took the socket's place (its hash node's
 *                   pprev, NULL once unhashed) and in which substate (SOCK_DONE
 *                   in sk_flags: the peer's FIN came); from the running kernel's
 *                   BTF, -1 when unknown (then user space asks sock_diag)
 *   TASK_LEADER_OFFSET, TASK_COMM_OFFSET
 *                   where the process's name is (its group leader's comm):
 *                   from the running kernel's BTF, -1 when unknown (then the
 *                   thread's own name)
 *   ACCEPT_HOOK     1: programs on the accept()/accept4() system calls' return
 *                   give an accepted socket its acceptor as owner (a listener
 *                   shared by forked workers is the master's); TASK_FILES_OFFSET,
 *                   FILES_FDT_OFFSET, FDT_MAX_FDS_OFFSET, FDT_FD_OFFSET,
 *                   FILE_PRIVATE_OFFSET, SOCKET_SK_OFFSET: the way from the new
 *                   descriptor to its struct sock, from the running kernel's BTF
 *                   and checked by user space on a connection of its own
 *   ACCEPT_RECORDS  1 (with ACCEPT_HOOK and a transition stream): an accept that
 *                   gives a socket another owner than its lines named is sent
 *                   as a record of its own (TCPTRACE_F_ACCEPTED)
 *   FILTER_NETNS    1: keep only sockets of the namespaces in netns_filter
 *   FILTER_OWNER    bitmask of OWNER_PID/OWNER_COMM/OWNER_CGROUP checks: keep
 *                   only sockets whose owner the kernel knows and that match
 *   MAX_LISTENERS   capacity of the listeners map (listening addresses)
 *   KEEP_ENDS       1: the per-socket map keeps each socket's ends, for the
 *                   records of the scan below (--stuck, OLDEST)
 *   SCAN_AGES       1: a second map keeps each socket's entry time and state
 *                   alone, once user space switches it on (ages_on): where the
 *                   kernel refuses the map iterator, user space reads that map,
 *                   16 bytes a socket, instead of the whole per-socket map
 *   SLOWER_THAN     1: submit only transitions that left their state after at
 *                   least its slow_ns threshold (--slower-than); the rest are
 *                   counted (TCPTRACE_C_FAST), in the statistics as always
 *   KERNEL_LIFETIMES 1: --lifetime: the per-socket map adds up each connection's
 *                   time in each state, and its end is submitted as one
 *                   struct tcptrace_life instead of transition events
 * Events are also shed beyond the rate user space allows (rate_limit map).
 */
#include "tcptrace.h"

#define TT_AF_INET 2
#define TT_AF_INET6 10
#define TT_IPPROTO_TCP 6

/* Linux TCP state numbers (include/net/tcp_states.h). */
#define TT_ESTABLISHED 1
#define TT_SYN_SENT 2
#define TT_SYN_RECV 3
#define TT_FIN_WAIT1 4
#define TT_FIN_WAIT2 5
#define TT_TIME_WAIT 6
#define TT_CLOSE 7
#define TT_CLOSE_WAIT 8
#define TT_LAST_ACK 9
#define TT_LISTEN 10
#define TT_CLOSING 11

/* Bits of the ports map values, and of FILTER_PORTS. */
#define PORT_ANY 1
#define PORT_LOCAL 2
#define PORT_REMOTE 4

/* Bits of FILTER_OWNER. */
#define OWNER_PID 1
#define OWNER_COMM 2
#define OWNER_CGROUP 4
/* Entries of the cgroup filter: a cgroup and everything below it. */
#define MAX_CGROUP_FILTERS 8

/* A socket's ends as its last transition gave them (kept for --stuck reports). */
struct sk_ends {
	u8 saddr[16];
	u8 daddr[16];
	u16 sport;
	u16 dport;
	u16 family;
	u16 reserved;
};

struct sk_info {
	u64 ts;   /* time of the socket's last transition: it entered `state` then */
	u64 cgroup_id; /* owner's, valid with TCPTRACE_F_OWNER_KNOWN */
	u32 pid;  /* owner, valid with TCPTRACE_F_OWNER_KNOWN */
	u32 flags; /* TCPTRACE_F_OWNER_KNOWN, OWNER_IN_CGROUP */
	char comm[TCPTRACE_COMM_LEN];
	u32 state; /* the state it is in now */
	u32 netns;
	u64 reported; /* ts when the scan reported it stuck in this state (--stuck) */
#if KEEP_ENDS
	struct sk_ends ends;
#endif
#if KERNEL_LIFETIMES
	u64 birth; /* when the connection began; 0: seen mid-life (its first visit untimed) */
	u64 visit_ns[TCPTRACE_LIFE_VISITS]; /* the states it visited and its time in each */
	u8 visit_state[TCPTRACE_LIFE_VISITS];
	u32 visits;
	u32 life_reserved;
#endif
};

/* A listening address: what tells listeners apart in the tracepoint's fields,
 * in its network namespace (two namespaces may listen on the same address). */
struct listen_key {
	u8 addr[16]; /* IPv4 uses the first 4 bytes, the rest zero */
	u32 netns;
	u16 family;
	u16 port;
};

struct owner {
	u64 cgroup_id;
	u32 pid;
	u32 flags; /* OWNER_IN_CGROUP */
	/* listening sockets on this exact address (SO_REUSEPORT): over one, the
	 * tracepoint cannot tell whose a child is, and user space looks it up */
	u32 count;
	char comm[TCPTRACE_COMM_LEN];
};

struct cgroup_filter {
	u64 id;    /* the cgroup's id (its directory's inode in cgroup2) */
	u32 level; /* its depth below the root (the root is level 0) */
	u32 used;
};

/* The program that runs: the tracepoint program, or the raw-tracepoint one that runs
 * in its place, nested in it on the same CPU (NESTED). Per-CPU state both write is
 * kept apart by level, or changed by atomic adds: the nested one may run between the
 * other's read and write. */
#define LEVEL_TRACEPOINT 0
#define LEVEL_NESTED 1
#define LEVELS 2

BPF_TABLE("lru_hash", u64, struct sk_info, sockets, MAX_SOCKETS);
#if SCAN_AGES
/* What the user-space scan reads of a socket (tcptrace/kernel/mapscan.py AGE): its
 * sk_info's ts and state, kept apart because a batch read of the whole sk_info map
 * costs twice as much (BENCHMARKS.md). Kept only while ages_on[0] is set. */
struct sk_age {
	u64 ts;
	u32 state;
	u32 reserved;
};
BPF_TABLE("lru_hash", u64, struct sk_age, ages, MAX_SOCKETS);
BPF_ARRAY(ages_on, u32, 1);

/* The socket entered `state` at `ts`: its age follows (fresh: it has no entry yet). */
static __always_inline void age_set(u64 sk, u64 ts, u32 state, int fresh)
{
	u32 zero = 0;
	u32 *on = ages_on.lookup(&zero);
	if (!on || !*on)
		return;
	if (!fresh) {
		struct sk_age *age = ages.lookup(&sk);
		if (age) {
			age->ts = ts;
			age->state = state;
			return;
		}
	}
	struct sk_age next = {.ts = ts, .state = state};
	ages.update(&sk, &next);
}

static __always_inline void age_forget(u64 sk)
{
	u32 zero = 0;
	u32 *on = ages_on.lookup(&zero);
	if (on && *on)
		ages.delete(&sk);
}
#else
#define age_set(sk, ts, state, fresh)
#define age_forget(sk)
#endif

/* The socket's entry goes (its age with it): 0 if there was one. */
static __always_inline int forget(u64 sk)
{
	age_forget(sk);
	return sockets.delete(&sk);
}
/* Owner of each listening address, inherited by the sockets it accepts. A plain
 * hash, not an LRU: an evicted entry would let a later listener on the same
 * address claim the children of one still open. */
BPF_HASH(listeners, struct listen_key, struct owner, MAX_LISTENERS);
/* Set once a listener did not fit in the map: from then on a new entry may hide
 * a listener that is not in the map, and claims no children. */
BPF_ARRAY(listeners_full, u32, 1);
BPF_ARRAY(ports, u8, 65536);
BPF_PERCPU_ARRAY(counters, u64, TCPTRACE_NCOUNTERS);
/* One state's duration histogram: one entry per state, not per bucket, so that user
 * space reads the whole histogram in one batch of NSTATES entries (13 entries of 4 KiB
 * per CPU: a memcpy each), not 6,656 (tcptrace/kernel/loader.py Probe.summary). */
struct hist_row {
	u64 slots[TCPTRACE_HIST_SLOTS];
};
_Static_assert((TCPTRACE_HIST_SLOTS & (TCPTRACE_HIST_SLOTS - 1)) == 0,
	       "a slot is masked into the row: HIST_SLOTS must be a power of two");
BPF_PERCPU_ARRAY(hist, struct hist_row, TCPTRACE_NSTATES);
BPF_PERCPU_ARRAY(dsum, u64, TCPTRACE_NSTATES);
BPF_PERCPU_ARRAY(dmax, u64, TCPTRACE_NSTATES * LEVELS);
BPF_PERCPU_ARRAY(trans, u64, TCPTRACE_NSTATES * TCPTRACE_NSTATES);
BPF_PERF_OUTPUT(events);
/* Events user space has read from each CPU's perf ring, published after each
 * read: submitted minus consumed is how far the consumer lags on this CPU. */
BPF_ARRAY(consumed, u64, MAX_CPUS);
/* Owner and namespace filters (filled by user space before attaching). */
BPF_HASH(netns_filter, u32, u8, 1024);
BPF_HASH(pid_filter, u32, u8, 1024);
struct comm_key {
	char comm[TCPTRACE_COMM_LEN];
};
BPF_HASH(comm_filter, struct comm_key, u8, 1024);
#if ACCEPT_RECORDS
/* Listening ports (by namespace) user space knows several processes share: under
 * owner filters their children's handshake lines go to user space undecided. */
struct shared_key {
	u32 netns;
	u16 port;
	u16 pad;
};
BPF_HASH(shared_ports, struct shared_key, u8, 1024);
#endif
BPF_ARRAY(cgroup_filters, struct cgroup_filter, MAX_CGROUP_FILTERS);
#ifndef CGROUP_ANCESTOR
#define CGROUP_ANCESTOR 1
#endif
#if (FILTER_OWNER & OWNER_CGROUP) && !CGROUP_ANCESTOR
/* Where tracepoint programs may not call bpf_get_current_ancestor_cgroup_id (Debian
 * 11's 5.10): the filtered cgroups and every cgroup below them, by id, which user
 * space walks and keeps up to date. */
BPF_HASH(cgroup_members, u64, u8, MAX_CGROUP_MEMBERS);
#endif
/* The start-up check of the netns offsets: user space arms slot 0, then listens
 * on a socket of its own; the program stores what it read in slot 1. */
#define CHECK_ARMED 0
#define CHECK_NETNS 1
BPF_ARRAY(self_check, u32, 2);
/* The start-up check of the nested program's struct offsets: while armed, both
 * programs note what they read of the check connection's sockets (in 127.84.84.0/24,
 * which nothing else uses: never traced) entering ESTABLISHED, by level and family
 * (AF_INET: the client; AF_INET6: the server's v4-mapped child). */
#define CHECK_NET 0x7f5454 /* 127.84.84 */
struct check_ends {
	u8 saddr[16];
	u8 daddr[16];
	u16 sport;
	u16 dport;
	u16 family;
	u16 protocol;
};
BPF_ARRAY(check_ends, struct check_ends, LEVELS * 2);
#if NESTED
/* The hits the tracepoint program took on this CPU that the nested program has not
 * seen yet: pushed as the tracepoint program starts, popped by the nested program,
 * which the kernel runs after it for each hit. A hit on top was taken; any other was
 * skipped, and is the nested program's. A stack: a softirq may come between the two
 * programs of a hit, and its own hits are pushed and popped in between. */
#define TAKEN_SLOTS 4 /* a power of two: the index is masked */
struct hit {
	u64 sk;
	u32 old;
	u32 new;
};
struct taken {
	u32 depth; /* runs on; a pop the nested program missed leaves an entry behind */
	u32 reserved;
	struct hit hits[TAKEN_SLOTS];
};
BPF_PERCPU_ARRAY(taken, struct taken, 1);

static __always_inline int same_hit(struct hit *h, u64 sk, int old, int new)
{
	return h->sk == sk && h->old == old && h->new == new;
}
#endif
/* --slower-than thresholds per state, in ns (0: never slow), filled by user space
 * before attaching; read only with SLOWER_THAN. */
BPF_ARRAY(slow_ns, u64, TCPTRACE_NSTATES);
/* Set in sk_info.flags and owner.flags: the owner was in a filtered cgroup. */
#define OWNER_IN_CGROUP 0x100
#if KERNEL_LIFETIMES
/* Where a life record is put together (too large for the stack beside the event). */
BPF_PERCPU_ARRAY(life_scratch, struct tcptrace_life, LEVELS);
#endif

static __always_inline void count(u32 idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Per-CPU submission budget set by user space (--max-cpu): at most
 * rate_limit[0] events per RATE_WINDOW_NS on each CPU, 0 for no limit. */
#define RATE_WINDOW_NS 10000000ULL
struct window {
	u64 start;
	u64 n;
};
BPF_ARRAY(rate_limit, u64, 1);
BPF_PERCPU_ARRAY(windows, struct window, 1);

static __always_inline int over_budget(u64 now)
{
	u32 zero = 0;
	u64 *limit = rate_limit.lookup(&zero);
	if (!limit || !*limit)
		return 0;
	struct window *w = windows.lookup(&zero);
	if (!w)
		return 0;
	if (now - w->start >= RATE_WINDOW_NS) {
		w->start = now;
		w->n = 0;
	}
	if (w->n >= *limit)
		return 1;
	w->n++;
	return 0;
}

/* The consumer lags too far behind on this CPU: shed rather than overflow. */
static __always_inline int lagging(void)
{
#if SHED_LAG
	u32 cpu = bpf_get_smp_processor_id();
	u32 idx = TCPTRACE_C_SUBMITTED, side_idx = TCPTRACE_C_SIDE;
	u64 *read = consumed.lookup(&cpu);
	u64 *sent = counters.lookup(&idx);
	/* the reader counts every record it read, transitions or not */
	u64 *side = counters.lookup(&side_idx);
	if (read && sent && side && *sent + *side - *read >= SHED_LAG)
		return 1;
#endif
	return 0;
}

static __always_inline u32 log2_u64(u64 v)
{
	u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

/* Mirrored by tcptrace.stats.hist_slot(): log2 bucket plus SUB_BITS of mantissa. */
static __always_inline u32 hist_slot(u64 v)
{
	u32 sub = 1 << TCPTRACE_HIST_SUB_BITS;
	if (v < sub)
		return v;
	u32 msb = log2_u64(v);
	u32 shift = msb - TCPTRACE_HIST_SUB_BITS;
	return ((msb - TCPTRACE_HIST_SUB_BITS + 1) << TCPTRACE_HIST_SUB_BITS) +
	       ((v >> shift) & (sub - 1));
}

/*
 * Transitions that only a system call on the socket makes (connect, listen,
 * close, shutdown): the current task then owns the socket. Every other
 * transition may run in softirq context on behalf of anybody.
 */
static __always_inline int by_owner(int old, int new)
{
	return (old == TT_CLOSE && (new == TT_SYN_SENT || new == TT_LISTEN)) ||
	       (old == TT_ESTABLISHED && new == TT_FIN_WAIT1) ||
	       (old == TT_CLOSE_WAIT && new == TT_LAST_ACK) ||
	       (old == TT_LISTEN && new == TT_CLOSE);
}

static __always_inline int port_match(u16 sport, u16 dport)
{
#if FILTER_PORTS
	u32 s = sport, d = dport;
	u8 *ps = ports.lookup(&s);
	u8 *pd = ports.lookup(&d);
	u8 fs = ps ? *ps : 0, fd = pd ? *pd : 0;
#if FILTER_PORTS & PORT_ANY
	if (!((fs | fd) & PORT_ANY))
		return 0;
#endif
#if FILTER_PORTS & PORT_LOCAL
	if (!(fs & PORT_LOCAL))
		return 0;
#endif
#if FILTER_PORTS & PORT_REMOTE
	if (!(fd & PORT_REMOTE))
		return 0;
#endif
#endif
	return 1;
}

/* The network namespace of the socket at sk, read through the BTF offsets. */
static __always_inline u32 sock_netns(u64 sk)
{
#if SK_NET_OFFSET >= 0 && NET_INUM_OFFSET >= 0
	u64 net = 0;
	u32 inum = 0;
	bpf_probe_read_kernel(&net, sizeof(net), (void *)(sk + SK_NET_OFFSET));
	if (net)
		bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + NET_INUM_OFFSET));
	return inum;
#else
	return 0;
#endif
}

/*
 * At a full socket's FIN_WAIT2/CLOSING -> CLOSE: did a timewait socket take its place,
 * and in which substate? tcp_time_wait() unhashes the socket for its timewait socket
 * before tcp_done() sets CLOSE (which unhashes it otherwise, after the tracepoint);
 * the peer's FIN (tcp_fin) set SOCK_DONE, so that timewait socket is in TIME_WAIT,
 * else it is an orphan's, still in FIN_WAIT2. Offsets from the running kernel's BTF.
 */
static __always_inline u32 timewait_flags(u64 sk)
{
#if SK_PPREV_OFFSET >= 0 && SK_FLAGS_OFFSET >= 0
	u64 pprev = 1, flags = 0;
	if (bpf_probe_read_kernel(&pprev, sizeof(pprev), (void *)(sk + SK_PPREV_OFFSET)) ||
	    bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(sk + SK_FLAGS_OFFSET)))
		return 0;
	if (pprev)
		return TCPTRACE_F_TW_KNOWN;
	return TCPTRACE_F_TW_KNOWN | TCPTRACE_F_TW |
	       ((flags >> SOCK_DONE_BIT) & 1 ? TCPTRACE_F_TW_PEER_FIN : 0);
#else
	return 0;
#endif
}

/*
 * The current process's name, as ps -o comm shows it: its group leader's comm (a
 * thread may have named itself otherwise, prctl(PR_SET_NAME)); offsets from the
 * running kernel's BTF, else the thread's own name.
 */
static __always_inline void process_comm(char *comm)
{
#if TASK_LEADER_OFFSET >= 0 && TASK_COMM_OFFSET >= 0
	u64 task = bpf_get_current_task(), leader = 0;
	if (bpf_probe_read_kernel(&leader, sizeof(leader), (void *)(task + TASK_LEADER_OFFSET)) == 0 &&
	    leader &&
	    bpf_probe_read_kernel(comm, TCPTRACE_COMM_LEN, (void *)(leader + TASK_COMM_OFFSET)) == 0)
		return;
#endif
	bpf_get_current_comm(comm, TCPTRACE_COMM_LEN);
}

/* At a system call of the owner: is it in one of the filtered cgroups (or below)? */
static __always_inline u32 current_in_cgroup(void)
{
#if (FILTER_OWNER & OWNER_CGROUP) && !CGROUP_ANCESTOR
	u64 id = bpf_get_current_cgroup_id();
	if (cgroup_members.lookup(&id))
		return OWNER_IN_CGROUP;
#elif FILTER_OWNER & OWNER_CGROUP
	for (u32 i = 0; i < MAX_CGROUP_FILTERS; i++) {
		u32 key = i;
		struct cgroup_filter *f = cgroup_filters.lookup(&key);
		if (!f || !f->used)
			break;
		if (bpf_get_current_ancestor_cgroup_id(f->level) == f->id)
			return OWNER_IN_CGROUP;
	}
#endif
	return 0;
}

/* Owner filters: only an owner the kernel knows can match. */
static __always_inline int owner_match(struct tcptrace_event *ev, u32 owner_flags)
{
#if FILTER_OWNER
	if (!(ev->flags & TCPTRACE_F_OWNER_KNOWN))
		return 0;
#if FILTER_OWNER & OWNER_PID
	if (!pid_filter.lookup(&ev->pid))
		return 0;
#endif
#if FILTER_OWNER & OWNER_COMM
	struct comm_key key = {};
	__builtin_memcpy(key.comm, ev->comm, sizeof(key.comm));
	if (!comm_filter.lookup(&key))
		return 0;
#endif
#if FILTER_OWNER & OWNER_CGROUP
	if (!(owner_flags & OWNER_IN_CGROUP))
		return 0;
#endif
#endif
	return 1;
}

/* --slower-than: the transition left `old` after at least its threshold. A birth
 * (from CLOSE, or a child from its listener) has no time in a state and a socket
 * seen mid-life no known time: neither has DELTA_KNOWN, neither is slow. */
static __always_inline int slow_enough(int old, struct tcptrace_event *ev)
{
	if (!(ev->flags & TCPTRACE_F_DELTA_KNOWN))
		return 0;
	u32 s = old;
	u64 *limit = slow_ns.lookup(&s);
	return limit && *limit && ev->delta_ns >= *limit;
}

static __always_inline void record_stats(int old, int new, u64 delta, int known, int level)
{
	u32 t = old * TCPTRACE_NSTATES + new;
	u64 *v = trans.lookup(&t);
	if (v)
		__sync_fetch_and_add(v, 1);
	if (!known)
		return;
	u32 s = old;
	struct hist_row *row = hist.lookup(&s);
	if (row)
		__sync_fetch_and_add(&row->slots[hist_slot(delta) & (TCPTRACE_HIST_SLOTS - 1)], 1);
	v = dsum.lookup(&s);
	if (v)
		__sync_fetch_and_add(v, delta);
	u32 m = old + level * TCPTRACE_NSTATES;
	v = dmax.lookup(&m);
	if (v && delta > *v)
		*v = delta;
}

/* Not a count: the entry was made after the map overflowed and may share its
 * address with a listener the map lost. */
#define LISTENERS_UNSURE 0x80000000U

static __always_inline void listener_open(struct listen_key *key, struct tcptrace_event *ev,
					  u32 owner_flags)
{
	u32 zero = 0;
	u32 *full = listeners_full.lookup(&zero);
	struct owner o = {.pid = ev->pid, .cgroup_id = ev->cgroup_id, .flags = owner_flags,
			  .count = 1};
	if (full && *full)
		o.count |= LISTENERS_UNSURE;
	__builtin_memcpy(o.comm, ev->comm, sizeof(o.comm));
	int err = listeners.insert(key, &o);
	if (err == 0)
		return;
	struct owner *l = listeners.lookup(key);
	if (l)
		/* a second listener on this address (SO_REUSEPORT) */
		__sync_fetch_and_add(&l->count, 1);
	else if (full)
		*full = 1;
}

static __always_inline void listener_close(struct listen_key *key)
{
	struct owner *l = listeners.lookup(key);
	if (!l)
		return;
	/* Two of a pair closing at once on two CPUs may both decrement and leave
	 * a count of 0: such an entry claims nothing, and a new listener makes it 1. */
	if ((l->count & ~LISTENERS_UNSURE) <= 1)
		listeners.delete(key);
	else
		__sync_fetch_and_add(&l->count, -1);
}

/* The one listener a new child of this local address came from, if the map
 * knows it: the exact address first, then the wildcard of its family, then for
 * IPv4 a dual-stack [::] listener. */
static __always_inline struct owner *listener_of(struct listen_key *key)
{
	struct owner *l = listeners.lookup(key);
	if (!l) {
		__builtin_memset(key->addr, 0, sizeof(key->addr));
		l = listeners.lookup(key);
	}
	if (!l && key->family == TT_AF_INET) {
		key->family = TT_AF_INET6;
		l = listeners.lookup(key);
	}
	if (l && l->count == 1)
		return l;
	return 0;
}

/* What the map keeps of a socket after this transition (its stuck report, if any,
 * belongs to the state it left: the flag goes). */
static __always_inline void remember(struct sk_info *info, struct tcptrace_event *ev,
				     u32 owner_flags)
{
	info->ts = ev->ts_ns;
	info->pid = ev->pid;
	info->cgroup_id = ev->cgroup_id;
	info->flags = (ev->flags & TCPTRACE_F_OWNER_KNOWN) | owner_flags;
	__builtin_memcpy(info->comm, ev->comm, sizeof(info->comm));
	info->state = ev->newstate;
	info->netns = ev->netns;
#if KEEP_ENDS
	__builtin_memcpy(info->ends.saddr, ev->saddr, sizeof(info->ends.saddr));
	__builtin_memcpy(info->ends.daddr, ev->daddr, sizeof(info->ends.daddr));
	info->ends.sport = ev->sport;
	info->ends.dport = ev->dport;
	info->ends.family = ev->family;
#endif
}

#if KERNEL_LIFETIMES
/* A new entry's life: it begins now, or was seen mid-life in `old` (untimed so far). */
static __always_inline void life_begin(struct sk_info *info, int birth, u32 old, u64 now)
{
	if (birth) {
		info->birth = now;
	} else {
		info->visit_state[0] = old;
		info->visits = 1;
	}
}

/* One more state visited: past the last slot, the last slot sums the rest. */
static __always_inline void life_visit(struct sk_info *info, u32 state, u64 ns)
{
	u32 i = info->visits;
	if (i < TCPTRACE_LIFE_VISITS)
		info->visit_state[i] = state;
	else
		i = TCPTRACE_LIFE_VISITS - 1;
	info->visit_ns[i] += ns;
	info->visits++;
}

/* The record of a connection ending with this transition (info: its entry, if any). */
static __always_inline struct tcptrace_life *life_end(struct sk_info *info,
						      struct tcptrace_event *ev, u32 level)
{
	struct tcptrace_life *life = life_scratch.lookup(&level);
	if (!life)
		return 0;
	__builtin_memcpy(&life->ev, ev, sizeof(life->ev));
	if (info) {
		life->birth_ns = info->birth;
		__builtin_memcpy(life->visit_ns, info->visit_ns, sizeof(life->visit_ns));
		__builtin_memcpy(life->visit_state, info->visit_state, sizeof(life->visit_state));
		life->visits = info->visits;
	} else {
		/* first seen as it closes: one untimed visit */
		__builtin_memset(life->visit_ns, 0, sizeof(life->visit_ns));
		__builtin_memset(life->visit_state, 0, sizeof(life->visit_state));
		life->birth_ns = 0;
		life->visits = 0;
	}
	u32 i = life->visits;
	if (i < TCPTRACE_LIFE_VISITS)
		life->visit_state[i] = ev->oldstate;
	else
		i = TCPTRACE_LIFE_VISITS - 1;
	life->visit_ns[i] += ev->delta_ns; /* 0 when untimed */
	life->visits++;
	return life;
}

/* Whether the connection visited a state SHOW_STATES asks for. */
static __always_inline int life_shown(struct tcptrace_life *life)
{
	u32 seen = 0;
	for (u32 j = 0; j < TCPTRACE_LIFE_VISITS; j++)
		if (j < life->visits)
			seen |= 1U << (life->visit_state[j] & 31);
#if SHOW_STATES & (1 << TT_TIME_WAIT)
	/* user space follows the timewait socket that may follow these */
	if (life->ev.oldstate == TT_FIN_WAIT2 || life->ev.oldstate == TT_CLOSING)
		seen |= 1U << TT_TIME_WAIT;
#endif
	return (seen & SHOW_STATES) != 0;
}
#endif

/*
 * One transition of a TCP socket, as the tracepoint gives it (the nested program
 * reads the same fields from the socket): saddr and daddr point to 4 bytes for
 * AF_INET, to 16 for AF_INET6.
 */
static __always_inline int on_transition(void *ctx, u64 sk, int old, int new, u16 family,
					 u16 sport, u16 dport, const void *saddr,
					 const void *daddr, u32 level)
{
	if (old <= 0 || old >= TCPTRACE_NSTATES || new <= 0 || new >= TCPTRACE_NSTATES)
		return 0;
	/* close() after shutdown() sets FIN_WAIT1 again: not a transition, and
	 * the time in FIN_WAIT1 runs on from the first one */
	if (old == new)
		return 0;
	u64 now = bpf_ktime_get_ns();
	/* read once a socket matches the filters: other traffic costs a map lookup */
	u32 netns = 0;

	if ((old == TT_CLOSE && new == TT_LISTEN) || (old == TT_LISTEN && new == TT_CLOSE)) {
		u32 armed_key = CHECK_ARMED;
		u32 *armed = self_check.lookup(&armed_key);
		if (armed && *armed && (bpf_get_current_pid_tgid() >> 32) == SELF_PID) {
			/* tcptrace's own check socket: note its namespace, never trace it */
			u32 slot = CHECK_NETNS;
			netns = sock_netns(sk);
			self_check.update(&slot, &netns);
			return 0;
		}
	}
#if FILTER_FAMILY
	/* after the check: its socket is IPv4 whatever the filter */
	if (family != FILTER_FAMILY)
		return 0;
#endif
#if FILTER_NETNS
	netns = sock_netns(sk);
	if (!netns_filter.lookup(&netns))
		return 0;
#endif

	/* A socket's first transition: connect() or listen() on a closed socket, or
	 * a child cloned from its listener. */
	int birth = old == TT_CLOSE || (old == TT_LISTEN && new == TT_SYN_RECV);
	struct sk_info *info = sockets.lookup(&sk);
	if (info && birth) {
		/* left by another socket at this address whose CLOSE the kernel
		 * skipped (recursion): its time and owner are not this socket's */
		count(TCPTRACE_C_STALE);
		if (forget(sk) == 0)
			count(TCPTRACE_C_DELETED);
		info = 0;
	}
	if (info && info->state == new) {
		/* in `new` already, from another state: this hit was handled once. The
		 * nested program handles a hit twice when a softirq with hits of its own
		 * interrupts it as it starts (its hit is then not found on the stack);
		 * seen in emulated VMs as a second SYN_SENT -> ESTABLISHED */
		return 0;
	}
	if (!info && !port_match(sport, dport)) {
#if FILTER_PORTS & PORT_LOCAL
		/* connect() enters SYN_SENT before the local port is chosen: keep
		 * the socket's start time, decide when its port is known. */
		if (sport == 0 && old == TT_CLOSE && new == TT_SYN_SENT) {
			struct sk_info pending = {.ts = now, .pid = bpf_get_current_pid_tgid() >> 32,
						  .cgroup_id = bpf_get_current_cgroup_id(),
						  .flags = TCPTRACE_F_OWNER_KNOWN | current_in_cgroup(),
						  .state = TT_SYN_SENT};
#if KERNEL_LIFETIMES
			pending.birth = now;
#endif
			process_comm(pending.comm);
			if (sockets.update(&sk, &pending) == 0)
				count(TCPTRACE_C_INSERTED);
			age_set(sk, now, TT_SYN_SENT, 1);
		}
#endif
		return 0;
	}
#if FILTER_PORTS & PORT_LOCAL
	if (info && sport != 0 && !port_match(sport, dport)) {
		/* a pending connect() whose chosen port does not match */
		if (forget(sk) == 0)
			count(TCPTRACE_C_DELETED);
		return 0;
	}
#endif

#if !FILTER_NETNS
	netns = sock_netns(sk);
#endif
	struct tcptrace_event ev = {};
	ev.ts_ns = now;
	ev.skaddr = sk;
	ev.family = family;
	ev.sport = sport;
	ev.dport = dport;
	ev.oldstate = old;
	ev.newstate = new;
	ev.netns = netns;
#if SK_NET_OFFSET >= 0 && NET_INUM_OFFSET >= 0
	if (netns)
		ev.flags |= TCPTRACE_F_NETNS_KNOWN;
#endif
	if (new == TT_CLOSE && (old == TT_FIN_WAIT2 || old == TT_CLOSING)) {
		ev.flags |= timewait_flags(sk);
		/* its timer, armed just now, fires on the timer wheel's grain after
		 * TCP_TIMEWAIT_LEN: user space works out when from the jiffies */
		if (ev.flags & TCPTRACE_F_TW)
			ev.jiffies = (u32)bpf_jiffies64();
	}
	if (family == TT_AF_INET) {
		bpf_probe_read_kernel(ev.saddr, 4, saddr);
		bpf_probe_read_kernel(ev.daddr, 4, daddr);
	} else {
		bpf_probe_read_kernel(ev.saddr, 16, saddr);
		bpf_probe_read_kernel(ev.daddr, 16, daddr);
	}

	int owner = by_owner(old, new);
	u32 owner_flags = 0; /* OWNER_IN_CGROUP of the owner, carried like pid and comm */
	if (info) {
		ev.delta_ns = now - info->ts;
		ev.flags |= TCPTRACE_F_DELTA_KNOWN;
	} else if (old != TT_CLOSE && old != TT_LISTEN) {
		/* a socket that was already mid-life when tracing began (or was
		 * evicted from the LRU map); LISTEN->SYN_RECV is a new child */
		count(TCPTRACE_C_NO_START);
	}

	if (owner) {
		ev.pid = bpf_get_current_pid_tgid() >> 32;
		process_comm(ev.comm);
		ev.cgroup_id = bpf_get_current_cgroup_id();
		ev.flags |= TCPTRACE_F_OWNER_KNOWN;
		owner_flags = current_in_cgroup();
	} else if (info && (info->flags & TCPTRACE_F_OWNER_KNOWN)) {
		ev.pid = info->pid;
		__builtin_memcpy(ev.comm, info->comm, sizeof(ev.comm));
		ev.cgroup_id = info->cgroup_id;
		ev.flags |= TCPTRACE_F_OWNER_KNOWN;
		owner_flags = info->flags & OWNER_IN_CGROUP;
	} else {
		struct owner *l = 0;
		struct listen_key key = {.netns = netns, .family = family, .port = sport};
		if (old == TT_LISTEN && new == TT_SYN_RECV) {
			__builtin_memcpy(key.addr, ev.saddr, sizeof(key.addr));
			l = listener_of(&key);
		}
		if (l) {
			ev.pid = l->pid;
			__builtin_memcpy(ev.comm, l->comm, sizeof(ev.comm));
			ev.cgroup_id = l->cgroup_id;
			ev.flags |= TCPTRACE_F_OWNER_KNOWN;
			owner_flags = l->flags & OWNER_IN_CGROUP;
		} else {
			/* softirq context: current is whoever ran; user space looks
			 * the owner up (sock_diag) */
			ev.pid = bpf_get_current_pid_tgid() >> 32;
			process_comm(ev.comm);
		}
	}

	/* every listener, whatever the owner filters: its children are named after
	 * it until their accept (one left out made its children ownerless, and the
	 * accept of each then looked like another process's) */
	if (new == TT_LISTEN || (old == TT_LISTEN && new == TT_CLOSE)) {
		struct listen_key key = {.netns = netns, .family = family, .port = sport};
		__builtin_memcpy(key.addr, ev.saddr, sizeof(key.addr));
		if (new == TT_LISTEN) {
			/* listen() without bind() has no port yet: its children are
			 * looked up in user space */
			if (sport)
				listener_open(&key, &ev, owner_flags);
		} else {
			listener_close(&key);
		}
	}

#if FILTER_OWNER
	if (!owner_match(&ev, owner_flags)) {
#if ACCEPT_HOOK && !KERNEL_LIFETIMES
		if ((old == TT_LISTEN && new == TT_SYN_RECV) ||
		    (old == TT_SYN_RECV && new == TT_ESTABLISHED)) {
			/* a child not accepted yet: its listener's owner may not be the
			 * process that accepts it (workers forked after listen()); kept,
			 * untold, for on_accepted to decide, its times running on */
			if (info) {
				remember(info, &ev, owner_flags);
			} else {
				struct sk_info next = {};
				remember(&next, &ev, owner_flags);
				if (sockets.update(&sk, &next) == 0)
					count(TCPTRACE_C_INSERTED);
			}
			age_set(sk, ev.ts_ns, ev.newstate, !info);
#if ACCEPT_RECORDS
			/* of a listener user space knows shared: sent, undecided, for
			 * its accept record to decide there (not counted seen yet) */
			struct shared_key shared = {.netns = netns, .port = sport};
			if (shared_ports.lookup(&shared)) {
				ev.flags |= TCPTRACE_F_UNDECIDED;
				if (events.perf_submit(ctx, &ev, sizeof(ev)) == 0)
					count(TCPTRACE_C_SIDE);
			}
#endif
			return 0;
		}
#endif
		/* another owner's socket, or one whose owner the kernel does not know:
		 * forget it, like a socket on another port */
		if (info && forget(sk) == 0)
			count(TCPTRACE_C_DELETED);
		return 0;
	}
#endif

	/* Count the map's inserts and deletes: LRU evictions are invisible here,
	 * user space infers them from these and the entries left. */
#if KERNEL_LIFETIMES
	struct tcptrace_life *life = 0; /* a connection's end: its record (not a listener's) */
#endif
	if (new == TT_CLOSE) {
#if KERNEL_LIFETIMES
		if (old != TT_LISTEN)
			life = life_end(info, &ev, level); /* before the entry goes */
#endif
		if (forget(sk) == 0)
			count(TCPTRACE_C_DELETED);
	} else {
		if (info) {
			/* in place: the socket's transitions are serialised by its lock,
			 * and an LRU update would take a new element and the bucket lock */
			remember(info, &ev, owner_flags);
#if KERNEL_LIFETIMES
			life_visit(info, old, ev.delta_ns);
#endif
		} else {
			struct sk_info next = {};
			remember(&next, &ev, owner_flags);
#if KERNEL_LIFETIMES
			life_begin(&next, birth, old, now);
#endif
			if (sockets.update(&sk, &next) == 0)
				count(TCPTRACE_C_INSERTED);
		}
		age_set(sk, ev.ts_ns, ev.newstate, !info);
	}

	count(TCPTRACE_C_SEEN);
	record_stats(old, new, ev.delta_ns, ev.flags & TCPTRACE_F_DELTA_KNOWN, level);

#if EMIT_EVENTS && KERNEL_LIFETIMES
	/* one record per connection, at its end; no transition events */
	if (life && life_shown(life)) {
		if (lagging() || over_budget(now))
			count(TCPTRACE_C_SHED);
		else if (events.perf_submit(ctx, life, sizeof(*life)) == 0)
			count(TCPTRACE_C_SUBMITTED);
		else
			count(TCPTRACE_C_DROPPED);
	}
#elif EMIT_EVENTS
	int show = ((1 << old) | (1 << new)) & SHOW_STATES;
#if SHOW_STATES & (1 << TT_TIME_WAIT)
	/* The kernel never reports TIME_WAIT: a socket entering it ends as
	 * FIN_WAIT2->CLOSE or CLOSING->CLOSE, which user space relabels
	 * (tcptrace/timewait.py) and filters again. */
	if (new == TT_CLOSE && (old == TT_FIN_WAIT2 || old == TT_CLOSING))
		show = 1;
#endif
#if SLOWER_THAN
	/* decided before the perf buffer: the fast majority costs neither ring
	 * space nor the reader's CPU, and is not shed or lost but counted */
	if (show && !slow_enough(old, &ev)) {
		count(TCPTRACE_C_FAST);
		show = 0;
	}
#endif
	if (show) {
		if (lagging() || over_budget(now))
			count(TCPTRACE_C_SHED);
		else if (events.perf_submit(ctx, &ev, sizeof(ev)) == 0)
			count(TCPTRACE_C_SUBMITTED);
		else
			count(TCPTRACE_C_DROPPED);
	}
#endif
	return 0;
}

/*
 * The start-up check of the nested program's offsets: is this a socket of a check
 * connection (its own address in 127.84.84.0/24, IPv4 or v4-mapped)? Then it is never
 * traced; and if it is ours (the armed value is our check server's port: another
 * tcptrace may be checking at the same time) note what was read of it as it enters
 * ESTABLISHED.
 */
static __always_inline int check_connection(u16 family, u16 protocol, int new, u16 sport,
					    u16 dport, const void *saddr, const void *daddr,
					    u32 level, int note, u32 port)
{
	struct check_ends seen = {.sport = sport, .dport = dport, .family = family,
				  .protocol = protocol};
	u32 len = family == TT_AF_INET ? 4 : 16;
	bpf_probe_read_kernel(seen.saddr, len & 31, saddr);
	bpf_probe_read_kernel(seen.daddr, len & 31, daddr);
	u32 net = (seen.saddr[0] << 16) | (seen.saddr[1] << 8) | seen.saddr[2];
	if (family != TT_AF_INET) /* IPv4 in a v4-mapped IPv6 address */
		net = (seen.saddr[12] << 16) | (seen.saddr[13] << 8) | seen.saddr[14];
	if (net != CHECK_NET)
		return 0;
	if (note && new == TT_ESTABLISHED && (sport == port || dport == port)) {
		u32 slot = level * 2 + (family != TT_AF_INET);
		check_ends.update(&slot, &seen);
	}
	return 1;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
#if NESTED
	u32 zero = 0;
	struct taken *t = taken.lookup(&zero);
	if (t) {
		/* the depth first: a softirq's hits in between go above this one */
		u32 d = t->depth;
		t->depth = d + 1;
		struct hit *h = &t->hits[d & (TAKEN_SLOTS - 1)];
		h->sk = (u64)args->skaddr;
		h->old = args->oldstate;
		h->new = args->newstate;
	}
#endif
	int ret = 0;
	if (args->protocol == TT_IPPROTO_TCP) {
		u16 family = args->family;
		const void *saddr = args->saddr, *daddr = args->daddr;
		if (family != TT_AF_INET) {
			saddr = args->saddr_v6;
			daddr = args->daddr_v6;
		}
		u32 armed_key = CHECK_ARMED;
		u32 *armed = self_check.lookup(&armed_key);
		if (!(armed && *armed &&
		      check_connection(family, args->protocol, args->newstate, args->sport,
				       args->dport, saddr, daddr, LEVEL_TRACEPOINT, 1, *armed)))
			ret = on_transition(args, (u64)args->skaddr, args->oldstate, args->newstate,
					    family, args->sport, args->dport, saddr, daddr,
					    LEVEL_TRACEPOINT);
	}
	return ret;
}

#if ACCEPT_HOOK
/* The check connection's server end, as on_accepted found it through the offsets
 * (tcptrace's own accept() while checking): its local and remote ports. */
BPF_ARRAY(accept_check, u32, 2);

/*
 * accept() or accept4() returned fd in the current process: the socket behind it is
 * the acceptor's from now on. A listener shared across fork() names the process that
 * called listen() (a master that never accepts); every later transition of the
 * connection, in softirq context too, names this one. Only sockets the map holds.
 */
static __always_inline int on_accepted(void *ctx, long fd)
{
	if (fd < 0)
		return 0;
	u64 task = bpf_get_current_task(), files = 0, fdt = 0, fds = 0, file = 0, sock = 0;
	u64 sk = 0;
	u32 max_fds = 0;
	if (bpf_probe_read_kernel(&files, sizeof(files), (void *)(task + TASK_FILES_OFFSET)) ||
	    !files ||
	    bpf_probe_read_kernel(&fdt, sizeof(fdt), (void *)(files + FILES_FDT_OFFSET)) || !fdt ||
	    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + FDT_MAX_FDS_OFFSET)) ||
	    fd >= max_fds ||
	    bpf_probe_read_kernel(&fds, sizeof(fds), (void *)(fdt + FDT_FD_OFFSET)) || !fds ||
	    bpf_probe_read_kernel(&file, sizeof(file), (void *)(fds + fd * sizeof(u64))) || !file ||
	    bpf_probe_read_kernel(&sock, sizeof(sock), (void *)(file + FILE_PRIVATE_OFFSET)) ||
	    !sock ||
	    bpf_probe_read_kernel(&sk, sizeof(sk), (void *)(sock + SOCKET_SK_OFFSET)) || !sk)
		return 0;
	u32 armed_key = CHECK_ARMED;
	u32 *armed = self_check.lookup(&armed_key);
	if (armed && *armed && (bpf_get_current_pid_tgid() >> 32) == SELF_PID) {
		/* tcptrace's own check connection: note what the offsets led to */
		u16 sport = 0, dport = 0;
		bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + INET_SPORT_OFFSET));
		bpf_probe_read_kernel(&dport, sizeof(dport), (void *)(sk + SK_DPORT_OFFSET));
		u32 slot = 0, v = bpf_ntohs(sport);
		accept_check.update(&slot, &v);
		slot = 1;
		v = bpf_ntohs(dport);
		accept_check.update(&slot, &v);
		return 0;
	}
	struct sk_info *info = sockets.lookup(&sk);
	if (!info)
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	/* another process than the one its lines named so far (a forked worker), or
	 * the first known: its lines named nobody */
	int known = info->flags & TCPTRACE_F_OWNER_KNOWN;
	int other = known && info->pid != tgid;
	int moved = !known || other;
	info->pid = tgid;
	process_comm(info->comm);
	info->cgroup_id = bpf_get_current_cgroup_id();
	info->flags = (info->flags & ~OWNER_IN_CGROUP) | TCPTRACE_F_OWNER_KNOWN | current_in_cgroup();
#if ACCEPT_RECORDS
	if (moved) {
		/* user space names the acceptor on the handshake lines it holds
		 * (tcptrace/sockets/acceptors.py); not a transition, not counted seen */
		struct tcptrace_event ev = {};
		ev.ts_ns = bpf_ktime_get_ns();
		ev.skaddr = sk;
		ev.pid = tgid;
		ev.cgroup_id = info->cgroup_id;
		ev.netns = info->netns;
		ev.flags = TCPTRACE_F_ACCEPTED | TCPTRACE_F_OWNER_KNOWN;
		if (other)
			ev.flags |= TCPTRACE_F_MOVED; /* its listener is shared */
		/* before the match: --comm compares it */
		__builtin_memcpy(ev.comm, info->comm, sizeof(ev.comm));
#if FILTER_OWNER
		if (owner_match(&ev, info->flags & OWNER_IN_CGROUP))
			ev.flags |= TCPTRACE_F_MATCHED;
#endif
		/* its local port, the listener's: which listener is shared */
		u16 port = 0;
		bpf_probe_read_kernel(&port, sizeof(port), (void *)(sk + INET_SPORT_OFFSET));
		ev.sport = bpf_ntohs(port);
		if (events.perf_submit(ctx, &ev, sizeof(ev)) == 0)
			count(TCPTRACE_C_SIDE);
	}
#endif
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
	return on_accepted(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
	return on_accepted(args, args->ret);
}
#endif

#if NESTED
/*
 * The kernel does not run the tracepoint program for a hit while a BPF program runs
 * on the CPU (most often this one, interrupted by the softirq that delivers a
 * packet): it counts the hit in the program's recursion_misses and moves on. A raw
 * tracepoint program is only kept from running inside itself, so this one runs then,
 * and handles the transition in its place. It runs after the tracepoint program for
 * each hit (user space attaches it last and checks the order at start): a hit that
 * program took is on top of `taken`. It reads from the socket what the tracepoint would
 * have given, at offsets from the running kernel's BTF.
 */
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
	u32 zero = 0, armed_key = CHECK_ARMED;
	u64 sk = ctx->args[0];
	int old = ctx->args[1], new = ctx->args[2];
	struct taken *t = taken.lookup(&zero);
	if (!t)
		return 0;
	/* On top, or just below: this program may be interrupted as it starts by a
	 * softirq whose hit the tracepoint program takes (pushed) and this one misses
	 * (running already); that entry stays above, and goes with this one. */
	u32 d = t->depth;
	int skipped = 1;
	if (d > 0 && same_hit(&t->hits[(d - 1) & (TAKEN_SLOTS - 1)], sk, old, new)) {
		skipped = 0;
		t->depth = d - 1;
	} else if (d > 1 && same_hit(&t->hits[(d - 2) & (TAKEN_SLOTS - 1)], sk, old, new)) {
		skipped = 0;
		t->depth = d - 2;
	}
	u32 *armed = self_check.lookup(&armed_key);
	u32 checking = armed ? *armed : 0; /* the check server's port while checking */
	if (!skipped && !checking)
		return 0;
	if (skipped)
		count(TCPTRACE_C_RECOVERED); /* any protocol's, as recursion_misses counts */
	u16 protocol = 0, family = 0, sport = 0, dport = 0;
	bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)(sk + SK_PROTOCOL_OFFSET));
	bpf_probe_read_kernel(&family, sizeof(family), (void *)(sk + SK_FAMILY_OFFSET));
	bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + INET_SPORT_OFFSET));
	bpf_probe_read_kernel(&dport, sizeof(dport), (void *)(sk + SK_DPORT_OFFSET));
	sport = bpf_ntohs(sport);
	dport = bpf_ntohs(dport);
	const void *saddr = (void *)(sk + INET_SADDR_OFFSET), *daddr = (void *)(sk + SK_DADDR_OFFSET);
	if (family != TT_AF_INET) {
		saddr = (void *)(sk + SK_V6_SADDR_OFFSET);
		daddr = (void *)(sk + SK_V6_DADDR_OFFSET);
	}
	/* the check's hits were all taken: one found skipped is not noted, and fails it */
	if (checking && check_connection(family, protocol, new, sport, dport, saddr, daddr,
					 LEVEL_NESTED, !skipped, checking))
		return 0;
	if (!skipped || protocol != TT_IPPROTO_TCP)
		return 0;
	return on_transition(ctx, sk, old, new, family, sport, dport, saddr, daddr, LEVEL_NESTED);
}
#endif

/*
 * The scan of the per-socket map (--stuck, the live table's OLDEST column, the
 * metrics' oldest and stuck gauges): a BPF iterator over the map's elements, run
 * by user space once a poll interval by reading the iterator (tracepoints cannot
 * use BPF timers, and bcc cannot relocate bpf_for_each_map_elem's callback).
 * Per state it notes the oldest entry time and the sockets past their --stuck
 * threshold; each socket that crossed its threshold since the last scan is
 * written to the iterator's output as a tcptrace_event with TCPTRACE_F_STUCK.
 * The iterator's context, as the running kernel's BTF defines it (user space
 * checks these offsets against the BTF before loading: tcptrace/kernel/btf.py).
 */
struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
	u64 session_id;
	u64 seq_num;
};
struct bpf_iter__bpf_map_elem {
	struct bpf_iter_meta *meta;
	void *map;
	void *key;
	void *value;
};

/* One scan's input and output: user space sets now and list_all, zeroes the rest.
 * Per-state arrays have a power-of-two length, indexed through a mask: older
 * verifiers (Linux 6.1) lose the bound of a compared index across the reloads. */
#define SCAN_SLOTS 16
/* An index into them, masked where it is used, behind a barrier the compiler cannot
 * see through (it would drop the mask as implied by the check before). */
#define SCAN_SLOT(st) ({ u32 __slot = (st); asm volatile("" : "+r"(__slot)); __slot & (SCAN_SLOTS - 1); })
struct scan {
	u64 now;      /* CLOCK_MONOTONIC at the scan's start: ages are measured to it */
	u64 list_all; /* SCAN_NEW, SCAN_STUCK or SCAN_EVERY: which sockets are written */
	u64 oldest[SCAN_SLOTS]; /* earliest entry time of a socket in each state, 0: none */
	u64 count[SCAN_SLOTS];  /* sockets in each state */
	u64 stuck[SCAN_SLOTS];  /* of them, past the state's threshold */
};
/* What a scan writes: the sockets that crossed their threshold since the last scan;
 * every socket past its threshold (the list at exit); every socket (its ends tell
 * user space which sockets of its start-up snapshot the map already holds). */
#define SCAN_NEW 0
#define SCAN_STUCK 1
#define SCAN_EVERY 2
BPF_ARRAY(scan, struct scan, 1);
/* --stuck thresholds per state, in ns (0: not watched). */
BPF_ARRAY(stuck_ns, u64, TCPTRACE_NSTATES);

BPF_ITER(bpf_map_elem)
{
	u64 *key = ctx->key;
	struct sk_info *info = ctx->value;
	if (!key || !info)
		return 0;
	u32 zero = 0;
	struct scan *sc = scan.lookup(&zero);
	if (!sc)
		return 0;
	u32 st = info->state;
	u64 entered = info->ts;
	if (st >= TCPTRACE_NSTATES || entered > sc->now)
		return 0; /* unknown, or it moved after the scan began: young */
	sc->count[SCAN_SLOT(st)]++;
	if (!sc->oldest[SCAN_SLOT(st)] || entered < sc->oldest[SCAN_SLOT(st)])
		sc->oldest[SCAN_SLOT(st)] = entered;
	u64 *limit = stuck_ns.lookup(&st);
	if (sc->list_all != SCAN_EVERY) {
		if (!limit || !*limit || sc->now - entered < *limit)
			return 0;
		sc->stuck[SCAN_SLOT(st)]++;
		/* reported for this stay in the state: the entry time it was reported at
		 * (a transition racing this scan changes ts, so the mark cannot outlive it) */
		if (sc->list_all != SCAN_STUCK && info->reported == entered)
			return 0;
		info->reported = entered;
	}
#if KEEP_ENDS
	struct tcptrace_event ev = {};
	ev.ts_ns = sc->now;
	ev.delta_ns = sc->now - entered;
	ev.skaddr = *key;
	ev.cgroup_id = info->cgroup_id;
	ev.pid = info->pid;
	ev.flags = TCPTRACE_F_STUCK | TCPTRACE_F_DELTA_KNOWN |
		   (info->flags & TCPTRACE_F_OWNER_KNOWN);
	ev.netns = info->netns;
#if SK_NET_OFFSET >= 0 && NET_INUM_OFFSET >= 0
	if (info->netns)
		ev.flags |= TCPTRACE_F_NETNS_KNOWN;
#endif
	__builtin_memcpy(ev.saddr, info->ends.saddr, sizeof(ev.saddr));
	__builtin_memcpy(ev.daddr, info->ends.daddr, sizeof(ev.daddr));
	ev.sport = info->ends.sport;
	ev.dport = info->ends.dport;
	ev.family = info->ends.family;
	ev.oldstate = st;
	ev.newstate = st;
	__builtin_memcpy(ev.comm, info->comm, sizeof(ev.comm));
	bpf_seq_write(ctx->meta->seq, &ev, sizeof(ev));
#endif
	return 0;
}
