import sys

from jaxcore.cli import main

sys.exit(main())
