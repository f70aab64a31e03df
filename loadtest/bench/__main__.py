"""`python -m loadtest.bench` is `fanout bench`."""

import sys

from loadtest.bench import main

sys.exit(main())
