"""The `sdrt` command line: the top layer, over the runtime, export and engines.

One module per command (`register(subparsers)` adds it, a handler runs it); argparse
stops here. Nothing in runtime/, export/ or engines/ imports this package.
"""
