"""`python -m dicomflow` runs the `dicomflow` command."""

import sys

from dicomflow.cli.main import main

sys.exit(main())
