import sys

from featherflux.cli import main

sys.exit(main())
