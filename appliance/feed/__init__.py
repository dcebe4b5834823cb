"""Transactions into the node as terminals send them: the seeded simulator, CSV replay, and
publishing with the wire contract's subject and ``Nats-Msg-Id``."""
