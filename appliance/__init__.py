"""Branchguard: real-time fraud scoring at the bank branch edge."""

__version__ = "0.1.0"
