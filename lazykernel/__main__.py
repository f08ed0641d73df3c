import sys

from lazykernel.cli import main

if __name__ == "__main__":  # `python -m lazykernel`; importing the module runs nothing
    sys.exit(main())
