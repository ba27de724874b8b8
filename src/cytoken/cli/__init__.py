"""The ``cytoken`` command line (thin commands that parse, then call the library)."""
