"""Measurements of a real node on this machine: throughput and latency against the
pass-through consumer (``throughput``), the analyst API (``api``), replication lag
(``replication``), and detection on the Fraud Detection Handbook protocol (``handbook``)."""
