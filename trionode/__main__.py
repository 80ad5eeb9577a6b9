import sys

from trionode.cli import main

sys.exit(main())
