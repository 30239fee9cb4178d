import sys

from distill_core.cli import main

sys.exit(main())
