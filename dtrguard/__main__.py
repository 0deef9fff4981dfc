import sys

from dtrguard.cli import main

sys.exit(main())
