"""Alert delivery: the outbox the scorer fills in the same transaction as each alert, and the
dispatcher process that routes, groups, paces and sends them through Apprise, with its
messages and metrics."""
