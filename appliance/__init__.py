"""Branchguard: real-time fraud scoring at the bank branch edge."""

__version__ = "0.1.0"

from .compiled import choose as _choose_compiled

_choose_compiled()  # the compiled hot modules, or their Python source (appliance/compiled.py)
