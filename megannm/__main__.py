from megannm.cli import main

raise SystemExit(main())
