"""Running a node: the embedded nats-server, ``branchguard run`` and its child processes,
Litestream replication and restore, and retention with its archives."""
