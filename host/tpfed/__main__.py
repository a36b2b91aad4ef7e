from tpfed.cli import main

raise SystemExit(main())
