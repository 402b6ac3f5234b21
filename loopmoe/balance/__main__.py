"""python -m loopmoe.balance ... (see loopmoe/balance/__init__.py)."""
import sys

from loopmoe.balance.cli import main

sys.exit(main())
