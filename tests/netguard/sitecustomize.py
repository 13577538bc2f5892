"""Loaded by every Python subprocess the server tests start (PYTHONPATH): refuse, and
record in $SDRT_NETGUARD_LOG, any socket connection to an address outside 127.0.0.0/8
and ::1, so a library that phones home fails the test instead of reaching the network."""

import os

if os.environ.get("SDRT_NETGUARD_LOG"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from serve_netguard import install

    install(os.environ["SDRT_NETGUARD_LOG"])
