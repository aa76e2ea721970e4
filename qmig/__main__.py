from qmig.cli import main

raise SystemExit(main())
