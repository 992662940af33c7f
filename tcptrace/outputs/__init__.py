"""Outputs: text lines and tables, JSON and CSV records, the live table, Prometheus
metrics and loss reports. Imports kernel/ and sockets/."""
