"""The ``certify-fx`` command line (installed as ``certify_fx_cli``, outside the library package so
that parsing never waits for torch or timm to import)."""
