from ggufkit.cli import main

raise SystemExit(main())
