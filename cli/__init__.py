"""The ``certify-fx`` command line (installed as ``certify_fx.cli``)."""
