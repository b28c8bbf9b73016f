"""``python -m grainfx`` (and ``torchrun -m grainfx``): the command line."""

from grainfx.cli import main

raise SystemExit(main())
