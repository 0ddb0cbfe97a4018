"""`python -m hf_gqa.cli ...` (and `accelerate launch -m hf_gqa.cli uptrain ...`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
