from krul.cli import main

raise SystemExit(main())
