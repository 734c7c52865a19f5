import sys

from histo_dist.cli import main

sys.exit(main())
