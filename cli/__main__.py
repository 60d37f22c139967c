from zk0.cli import main

raise SystemExit(main())
