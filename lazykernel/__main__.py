import sys

from lazykernel.cli import main

sys.exit(main())
