import sys

from sfr.cli import main

sys.exit(main())
