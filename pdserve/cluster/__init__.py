"""Start and stop pdserve on Ray from a config, and the ``pdserve`` command line."""
