import sys

from biasedit_peft.cli import main

sys.exit(main())
