"""``python -m distilkit`` (and ``accelerate launch -m distilkit``) runs the CLI."""
import sys

from distilkit.cli import main

sys.exit(main())
