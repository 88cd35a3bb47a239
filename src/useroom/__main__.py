from useroom._cli import main

raise SystemExit(main())
