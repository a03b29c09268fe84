"""``python -m functional_memopt`` runs the ``memopt`` command."""

from .app.cli import main

raise SystemExit(main())
