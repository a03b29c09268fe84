"""``python -m functional_memopt`` runs the ``memopt`` command."""

from .cli import main

raise SystemExit(main())
