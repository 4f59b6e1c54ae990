"""``python -m sf_ext.dlg``: see :mod:`sf_ext.dlg.cli`."""

import sys

from sf_ext.dlg.cli import main

sys.exit(main())
