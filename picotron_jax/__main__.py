import sys

from picotron_jax.cli import main

sys.exit(main())
