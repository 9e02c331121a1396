"""``python -m demo``: the demo's command line (see :mod:`demo.run`)."""

from .run import main

raise SystemExit(main())
