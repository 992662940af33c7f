"""tcptrace: live TCP state transitions and time spent in each state, via eBPF."""

__version__ = "0.1.0"
