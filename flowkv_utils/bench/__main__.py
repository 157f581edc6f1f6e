"""`python -m flowkv_utils.bench ...`: see the package docstring."""

import sys

from .cli import main

sys.exit(main())
