"""The socket table and enrichment: sock_diag, processes, namespaces and cgroups, and the
stages that add owners, follow TIME_WAIT and build lifetimes. Imports kernel/, never outputs/."""
