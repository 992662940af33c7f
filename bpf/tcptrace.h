/* SPDX-License-Identifier: MIT */
/*
 * The one definition of what crosses from the kernel to tcptrace.
 * tcptrace/events.py mirrors struct tcptrace_event and the constants below;
 * tests/kernel/test_layout.py parses this file and checks that the two agree.
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

#define TCPTRACE_COMM_LEN 16
/* Linux TCP state numbers run 1..12 (TCP_NEW_SYN_RECV = 12); index 0 is unused. */
#define TCPTRACE_NSTATES 13
/* Duration histogram: log2 buckets of nanoseconds, each split into 2^SUB_BITS sub-buckets. */
#define TCPTRACE_HIST_SUB_BITS 3
#define TCPTRACE_HIST_SLOTS 512

/* event.flags */
#define TCPTRACE_F_DELTA_KNOWN 0x1 /* delta_ns is measured from a traced transition */
#define TCPTRACE_F_OWNER_KNOWN 0x2 /* pid/comm/cgroup_id belong to the socket's owner */
#define TCPTRACE_F_NETNS_KNOWN 0x4 /* netns was read from the socket (BTF offsets) */
/* Not a transition: the map scan found the socket in newstate (== oldstate) for
 * delta_ns, past its --stuck threshold; ts_ns is the scan's time. */
#define TCPTRACE_F_STUCK 0x8
/* At FIN_WAIT2/CLOSING -> CLOSE (tcptrace/sockets/timewait.py): the program looked
 * whether a timewait socket took the socket's place (TW_KNOWN); one did (TW); the
 * peer's FIN had come, so it is in TIME_WAIT, not an orphan's FIN_WAIT2 (TW_PEER_FIN). */
#define TCPTRACE_F_TW_KNOWN 0x10
#define TCPTRACE_F_TW 0x20
#define TCPTRACE_F_TW_PEER_FIN 0x40
/* Not a transition: accept() gave the socket skaddr to pid/comm/cgroup_id, another
 * process than its lines named before (a listener shared by forked workers names
 * its creator until then), or its lines named nobody; ts_ns is the accept's time,
 * oldstate = newstate = 0. With TCPTRACE_F_MOVED: they named another process (the
 * listener is shared across processes); without: no owner. */
#define TCPTRACE_F_ACCEPTED 0x80
#define TCPTRACE_F_MOVED 0x400
/* Under owner filters: a shared listener's child whose listener's owner does not
 * match, sent for its accept record to decide (not counted seen, no statistics);
 * on an accept record: the acceptor matches the owner filters. */
#define TCPTRACE_F_UNDECIDED 0x100
#define TCPTRACE_F_MATCHED 0x200
/* Bits 16-31 of flags are set by user space only (tcptrace/events.py F_DELTA_LOWER...). */

/* Indexes of the per-CPU counters map. */
#define TCPTRACE_C_SEEN 0       /* transitions that passed the filters */
#define TCPTRACE_C_SUBMITTED 1  /* events handed to the perf buffer */
#define TCPTRACE_C_DROPPED 2    /* perf buffer full: event not delivered */
#define TCPTRACE_C_SHED 3       /* event not submitted on purpose (consumer lagging) */
#define TCPTRACE_C_NO_START 4   /* first transition of a socket seen mid-life */
/* Per-socket map traffic: entries evicted by the LRU = INSERTED - DELETED - entries left. */
#define TCPTRACE_C_INSERTED 5   /* sockets added to the per-socket map */
#define TCPTRACE_C_DELETED 6    /* sockets removed from it (CLOSE, filtered out, or stale) */
/* A socket's first transition found an entry at its address: another socket's,
 * whose CLOSE the kernel skipped (recursion). Removed (and counted deleted). */
#define TCPTRACE_C_STALE 7
/* Not submitted: it left its state sooner than that state's --slower-than threshold
 * (or left a state without one, or after an unknown time). */
#define TCPTRACE_C_FAST 8
/* Tracepoint hits the kernel skipped because the tracepoint program was running on
 * this CPU (interrupted by the softirq that made this transition), which the nested
 * program handled in its place: subtracted from the skipped hits (any protocol's). */
#define TCPTRACE_C_RECOVERED 9
/* Records that are not transitions (accept records, undecided handshake lines: see
 * TCPTRACE_F_ACCEPTED) handed to the perf buffer; not in SEEN or SUBMITTED. */
#define TCPTRACE_C_SIDE 10
#define TCPTRACE_NCOUNTERS 11

struct tcptrace_event {
	__u64 ts_ns;    /* bpf_ktime_get_ns() at the transition */
	__u64 delta_ns; /* time spent in oldstate (valid with TCPTRACE_F_DELTA_KNOWN) */
	__u64 skaddr;   /* kernel address of the socket: identity (read only for netns) */
	__u64 cgroup_id; /* owner's cgroup v2 id (with TCPTRACE_F_OWNER_KNOWN), else 0 */
	__u32 pid;      /* owner tgid (valid with TCPTRACE_F_OWNER_KNOWN), else current */
	__u32 flags;
	__u32 netns;    /* the socket's network namespace inode (TCPTRACE_F_NETNS_KNOWN) */
	__u32 jiffies;  /* with TCPTRACE_F_TW: the kernel's jiffies (low 32 bits) as the
			 * timewait socket's timer was armed; else 0 */
	__u8 saddr[16]; /* IPv4 uses the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;    /* host byte order, as the tracepoint gives it */
	__u16 dport;
	__u16 family;
	__u8 oldstate;
	__u8 newstate;
	char comm[TCPTRACE_COMM_LEN];
};

/*
 * --lifetime (KERNEL_LIFETIMES): the program adds up each connection's time in each
 * state in its per-socket map and, when the socket closes, submits one record instead
 * of the transitions. tcptrace/kernel/events.py mirrors it (LIFE_FIELDS).
 */
/* States recorded per connection; past them the last slot sums the rest (visits counts all). */
#define TCPTRACE_LIFE_VISITS 8

struct tcptrace_life {
	struct tcptrace_event ev; /* the closing transition (newstate CLOSE); ts_ns leads */
	__u64 birth_ns; /* when the connection began; 0: seen mid-life, its first visit untimed */
	__u64 visit_ns[TCPTRACE_LIFE_VISITS]; /* time in each state visited, in order */
	__u8 visit_state[TCPTRACE_LIFE_VISITS];
	__u32 visits;   /* states visited, the closing one included */
	__u32 reserved; /* zero: keeps the struct free of padding */
};

#endif /* TCPTRACE_H */
