import sys

from recbole_mm.experiments.table import main

sys.exit(main())
