"""The hot path: a transaction off the stream to its verdict, and nothing else.

``pipeline`` is the only module that knows the stages' order: ``ingest`` (JetStream) ->
``features`` -> ``model`` and ``rules`` -> ``score`` -> the store -> the verdict. Beside them,
what the scorer reads and people change: the model ``registry``, the allow and deny ``lists``
and the fraud ``labels``. Nothing here imports learning, case work, alerts, operations, the
API or the console (import-linter's contracts in ``pyproject.toml`` say so).
"""
