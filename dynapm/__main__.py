from dynapm.cli import main

raise SystemExit(main())
