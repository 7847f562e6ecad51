import sys

from bnexport.cli.main import main

sys.exit(main())
