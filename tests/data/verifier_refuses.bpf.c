/* SPDX-License-Identifier: MIT */
/*
 * For tests only (tests/integration/test_errors.py, through TCPTRACE_BPF_PROGRAM):
 * valid C that compiles, attached to the same tracepoint, that the kernel's BPF
 * verifier must refuse: a hash map value is used without the NULL check.
 */
BPF_HASH(slot, u32, u64, 1);

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	u32 key = 0;
	u64 *v = slot.lookup(&key);
	(*v)++;
	return 0;
}
