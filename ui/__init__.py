"""The analyst console: NiceGUI pages served under ``/console`` by ``branchguard serve``.

Pages read and write only through library functions in ``appliance/`` (queue.py,
casefile.py, overview.py, cases.py, lists.py, users.py); none of them holds SQL.
"""
