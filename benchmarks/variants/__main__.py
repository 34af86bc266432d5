"""``python -m benchmarks.variants``: the calibration of AGD's variants."""

import sys

from benchmarks.variants.calibrate import main

sys.exit(main())
