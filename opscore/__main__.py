from opscore.cli import main

raise SystemExit(main())
