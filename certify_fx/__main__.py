"""``python -m certify_fx`` runs the ``certify-fx`` command line."""

import sys

from certify_fx_cli.main import main

sys.exit(main())
