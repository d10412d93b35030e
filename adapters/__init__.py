"""sharedquant.adapters: the stateful edges (modules, buffers, hooks, files, the command line)."""
