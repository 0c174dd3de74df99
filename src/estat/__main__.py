from estat.cli import main

raise SystemExit(main())
