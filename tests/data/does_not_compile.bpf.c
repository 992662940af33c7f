/* SPDX-License-Identifier: MIT */
/* For tests only (through TCPTRACE_BPF_PROGRAM): a program the compiler refuses. */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	return undeclared_variable;
}
