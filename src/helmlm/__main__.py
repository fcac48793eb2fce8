import sys

from helmlm.cli import main

sys.exit(main())
