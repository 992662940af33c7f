"""Kernel side: the BPF program's loader, its perf rings, the event layout and the
kernel's statistics. bpf/ -> perf buffer -> decode happen here; nothing here imports
the packages above (sockets, outputs)."""
