"""`python -m xhcidbg` is the `xhcidbg` command."""
import sys

from .cli import main

sys.exit(main())
